"""Continuous batching under a KV budget (eval/serving.py): outputs equal generating each request alone, the
budget holds at every step (bytes from the allocator), every block is freed, and a budget that cannot hold one
sequence is one clear error."""

import pytest
import torch
from transformers import DynamicCache

import dmc
from dmc.eval.policies import H2O, Budget, SnapKV
from dmc.eval.serving import BudgetError, Request, serve
from tests.helpers import mixed_dmc, random_ids, tiny_llama

LENGTHS = [(9, 6), (23, 3), (4, 11), (17, 8), (30, 5), (12, 9), (6, 4)]  # (prompt, new tokens): mixed


def _requests():
    return [Request(random_ids(1, n, seed=i)[0], new) for i, (n, new) in enumerate(LENGTHS)]


@torch.no_grad()
def _alone(model, request, cache):
    """Greedy tokens and their logits for one request by itself: prefill, then one token at a time."""
    logits = [model(request.prompt[None], past_key_values=cache, use_cache=True).logits[0, -1]]
    while len(logits) < request.max_new_tokens:
        tok = logits[-1].argmax().view(1, 1)
        logits.append(model(tok, past_key_values=cache, use_cache=True).logits[0, -1])
    return [int(x.argmax()) for x in logits], torch.stack(logits)


def _check_equal_alone(result, model, requests, new_cache):
    for request, tokens, logits in zip(requests, result.outputs, result.logits):
        want_tokens, want_logits = _alone(model, request, new_cache())
        assert tokens == want_tokens
        torch.testing.assert_close(logits, want_logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("budget_blocks", [400, 60])  # roomy: all in flight; tight: the budget limits the batch
def test_dmc_outputs_equal_each_request_alone_within_the_budget(budget_blocks):
    model = mixed_dmc("gqa", window=12)
    block = 2 * 4 * model.config.dmc_head_dim * 8  # bytes of one block of 4 float64 slots, keys and values
    requests = _requests()
    result = serve(model, requests, budget_blocks * block, block_size=4, record_logits=True)
    _check_equal_alone(result, model, requests, lambda: dmc.DMCCache(model.config, block_size=4))
    stats = result.stats
    assert 0 < stats.peak_bytes <= budget_blocks * block
    assert stats.final_bytes == 0
    assert stats.generated_tokens == sum(new for _, new in LENGTHS)
    if budget_blocks == 60:
        assert stats.max_in_flight < len(requests)  # the budget, not the queue, limited the batch


def test_vanilla_on_the_paged_storage_is_the_vanilla_model():
    model = tiny_llama("gqa", dtype=torch.float64)
    requests = _requests()
    result = serve(model, requests, 10**7, block_size=4, record_logits=True)
    _check_equal_alone(result, model, requests, lambda: DynamicCache(config=model.config))
    stats = result.stats
    assert stats.max_in_flight == len(requests) and stats.final_bytes == 0
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"  # restored afterwards


def test_compression_fits_more_sequences_in_the_same_budget():
    vanilla = tiny_llama("gqa", dtype=torch.float64)
    compressed = mixed_dmc("gqa", window=12)  # about half of its decisions merge
    requests = [Request(random_ids(1, 40, seed=i)[0], 6) for i in range(8)]
    one = serve(vanilla, requests[:1], 10**9, block_size=4).stats.peak_bytes  # one whole vanilla sequence
    v = serve(vanilla, requests, 3 * one, block_size=4).stats
    d = serve(compressed, requests, 3 * one, block_size=4).stats
    assert v.max_in_flight <= 3 < d.max_in_flight


def test_policies_share_the_loop_and_history_policies_are_refused():
    model = tiny_llama("gqa", dtype=torch.float64)
    result = serve(model, _requests(), 10**7, policy=H2O(Budget(cr=2)), block_size=4)
    assert [len(o) for o in result.outputs] == [new for _, new in LENGTHS] and result.stats.final_bytes == 0
    with pytest.raises(ValueError, match="attention history"):
        serve(model, _requests(), 10**7, policy=SnapKV(Budget(cr=2)), block_size=4)


def test_a_budget_smaller_than_one_sequence_is_one_line():
    model = mixed_dmc("gqa", window=12)
    with pytest.raises(BudgetError, match="cannot hold one sequence") as err:
        serve(model, _requests(), 1000, block_size=4)
    assert "\n" not in str(err.value) and "--kv-budget" in str(err.value)


def test_preempted_sequences_are_recomputed_and_the_budget_still_holds(monkeypatch):
    # admission that ignores growth fills the budget with prompts alone; every step's worst-case reserve must
    # then preempt the newest sequences (freed, queued again, recomputed from scratch) to stay in budget
    from dmc.serve.engine import Engine

    monkeypatch.setattr(Engine, "_growth_bytes", lambda self, cache, rows: 0)
    model = mixed_dmc("gqa", window=12)
    block = 2 * 4 * model.config.dmc_head_dim * 8
    requests = _requests()
    result = serve(model, requests, 60 * block, block_size=4, record_logits=True)
    stats = result.stats
    assert stats.preempted > 0 and stats.discarded_tokens > 0
    _check_equal_alone(result, model, requests, lambda: dmc.DMCCache(model.config, block_size=4))
    assert 0 < stats.peak_bytes <= 60 * block and stats.final_bytes == 0
    assert stats.generated_tokens == sum(new for _, new in LENGTHS)  # discarded tokens are not delivered twice
