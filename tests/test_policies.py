"""Baseline cache policies: exact when the budget holds everything, the budget is the cache size, ragged GQA
batches are independent per row, and each policy keeps the set its paper's rule implies."""

import math

import pytest
import torch

from dmc.eval.policies import (
    H2O,
    POLICIES,
    TOVA,
    Budget,
    PolicyCache,
    Scissorhands,
    SnapKV,
    StreamingLLM,
    apply_policy,
    policy_attention,
)
from dmc.eval.policies.paged import PolicyLayer
from tests.helpers import left_padded_rows, one_line_exit, random_ids, tiny_llama


def _model(kind="gqa", dtype=torch.float64):
    model = tiny_llama(kind, dtype=dtype).eval()
    apply_policy(model)
    return model


def test_policy_attention_restores_the_model_on_leaving_even_after_an_error():
    from transformers.models.llama.modeling_llama import LlamaAttention

    model = tiny_llama("gqa", dtype=torch.float64).eval()
    ids = random_ids(2, 12)
    with torch.no_grad():
        before = model(ids).logits
        with pytest.raises(RuntimeError, match="inside"), policy_attention(model):
            assert all(type(layer.self_attn).__name__ == "PolicyLlamaAttention" for layer in model.model.layers)
            cache = PolicyCache(model.config, H2O(Budget(cr=2)), block_size=4)
            model(ids, past_key_values=cache)
            raise RuntimeError("inside the block")
        assert all(type(layer.self_attn) is LlamaAttention for layer in model.model.layers)
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_a_budget_that_holds_everything_is_the_vanilla_model(name, kind):
    model = _model(kind)
    ids = random_ids(2, 21)
    with torch.no_grad():
        want = model(ids).logits  # no PolicyCache: plain Llama attention
        cache = PolicyCache(model.config, POLICIES[name](Budget(cr=1)), block_size=4)
        got = torch.cat([model(ids[:, :9], past_key_values=cache).logits,
                         model(ids[:, 9:], past_key_values=cache).logits], 1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(POLICIES))
@pytest.mark.parametrize("budget,expect", [(Budget(cr=4), math.ceil(37 / 4)), (Budget(tokens=7), 7)])
def test_realised_cache_size_is_the_budget(name, budget, expect):
    model = _model()
    cache = PolicyCache(model.config, POLICIES[name](budget), block_size=4)
    with torch.no_grad():
        model(random_ids(2, 37), past_key_values=cache)
    H_kv = model.config.num_key_value_heads
    for i in range(model.config.num_hidden_layers):
        assert (cache.num_slots(i) == expect).all()
    per_slot = 2 * model.config.head_dim * 8
    blocks_per_pair = math.ceil(expect / 4)
    assert cache.allocated_bytes() == model.config.num_hidden_layers * 2 * H_kv * blocks_per_pair * 4 * per_slot


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_ragged_gqa_batch_rows_equal_each_row_alone(name):
    model = _model("gqa")
    lengths = [23, 11, 1]
    rows, ids, mask, pos = left_padded_rows(lengths)
    T = max(lengths)
    policy = POLICIES[name](Budget(cr=3))
    with torch.no_grad():
        cache = PolicyCache(model.config, policy, block_size=4)
        batched = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
        for i, r in enumerate(rows):
            alone_cache = PolicyCache(model.config, policy, block_size=4)
            alone = model(r[None], past_key_values=alone_cache).logits[0]
            torch.testing.assert_close(batched[i, T - len(r):], alone, rtol=1e-9, atol=1e-9)
            assert torch.equal(cache.num_slots(0)[i], alone_cache.num_slots(0)[0])
    assert cache.num_slots(0)[:, 0].tolist() == [math.ceil(n / 3) for n in lengths]


def _drive(policy, steps, heavy=(), H=2, D=4, block=3):
    """Feed ``steps`` tokens into one layer; attention puts 1.0 on positions in ``heavy`` and on the newest
    token, 0.01 elsewhere. Returns the kept positions of each head."""
    layer = PolicyLayer(H, D, block, policy)
    for t in range(steps):
        layer.append(torch.randn(1, H, D), torch.randn(1, H, D), torch.ones(1, dtype=torch.bool))
        pos = layer.pos_pool
        probs = torch.where(torch.isin(pos, torch.tensor(list(heavy) + [t])), 1.0, 0.01)
        layer.observe(probs)
        layer.enforce()
    view = layer.pair_view(layer.pos_pool, -1)[0]
    return [sorted(x for x in row.tolist() if x >= 0) for row in view]


def test_streaming_llm_keeps_sinks_and_the_recent_window():
    kept = _drive(StreamingLLM(Budget(tokens=8), sinks=4), 20)
    assert kept == [[0, 1, 2, 3, 16, 17, 18, 19]] * 2


def test_h2o_keeps_heavy_hitters_and_the_recent_half():
    kept = _drive(H2O(Budget(tokens=6)), 20, heavy=(2, 5, 11))
    assert kept == [[2, 5, 11, 17, 18, 19]] * 2


def test_tova_keeps_what_the_current_query_attends_to():
    kept = _drive(TOVA(Budget(tokens=4)), 15, heavy=(1, 7, 9))
    assert kept == [[1, 7, 9, 14]] * 2


def test_scissorhands_drops_the_tokens_most_often_below_a_uniform_share():
    kept = _drive(Scissorhands(Budget(tokens=6), history=32, recent=2), 20, heavy=(2, 5, 11))
    assert kept == [[2, 5, 11, 17, 18, 19]] * 2  # 17 was low-attention twice, older tokens more often


def test_snapkv_keeps_the_observation_window_and_what_it_attends_to():
    kept = _drive(SnapKV(Budget(tokens=5), window=2, kernel=1), 20, heavy=(2, 5, 11))
    assert kept == [[2, 5, 11, 18, 19]] * 2


def test_snapkv_pooling_favours_neighbours_of_attended_tokens():
    """The least attended token (position 1) sits next to the most attended one (position 0): without
    pooling it is dropped, with pooling over 3 positions its neighbourhood keeps it and position 2 goes."""
    weights = torch.tensor([1.0, 0.05, 0.3, 0.3, 0.1, 0.3])
    dropped = {}
    for kernel in (1, 3):
        policy = SnapKV(Budget(tokens=5), window=1, kernel=kernel)
        layer = PolicyLayer(1, 4, 4, policy)
        for _ in range(6):
            layer.append(torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.ones(1, dtype=torch.bool))
        layer.hist_pool[..., 0] = weights[layer.pos_pool]
        slot = policy.choose(layer, torch.ones(1, 1, dtype=torch.bool))
        dropped[kernel] = int(layer.pair_view(layer.pos_pool, -1)[0, 0, slot[0, 0]])
    assert dropped == {1: 1, 3: 2}


def test_budget_is_validated():
    with pytest.raises(ValueError, match="either cr"):
        Budget()
    with pytest.raises(ValueError, match="out of range"):
        Budget(cr=0.5)


def test_eval_runs_a_policy_through_its_cache(tmp_path):
    """dmc eval --policy: log-likelihoods, generation and the CR meter go through the PolicyCache."""
    from dmc.eval.lm import EvalModel
    from tests.helpers import write_tiny_checkpoint

    folder = write_tiny_checkpoint(tmp_path / "tiny")
    lm = EvalModel(folder, batch_size=2, policy=H2O(Budget(cr=2)))
    assert lm.name == "tiny+h2o@2x" and lm.compressed
    pairs = [("def add(a, b):\n    return a", " + b"), ("import os\nimport", " sys")]
    scores, counts = lm.loglikelihood(pairs)
    for (ctx, cont), c in zip(pairs, counts):
        n = sum(len(x) for x in lm.encode_pair(ctx, cont)) - 1
        assert c["tokens"] == n and all(n - m == math.ceil(n / 2) for row in c["merges"] for m in row)
    texts, gen_counts = lm.generate(["x = 1\n", "import sys\nprint("], 5)
    assert len(texts) == 2 and all(c["tokens"] > 0 for c in gen_counts)
    full = EvalModel(folder, batch_size=2, policy=H2O(Budget(cr=1)))
    vanilla = EvalModel(folder, batch_size=2)
    got = [score for score, _ in full.loglikelihood(pairs)[0]]
    want = [score for score, _ in vanilla.loglikelihood(pairs)[0]]
    assert got == pytest.approx(want, abs=1e-4)


def test_eval_cli_refuses_bad_policy_options(tmp_path):
    from dmc.eval.run import main

    for argv, msg in [(["--policy", "lru", "--budget-cr", "2"], "unknown policy 'lru'"),
                      (["--policy", "h2o"], "either cr"), (["--budget-cr", "2"], "go with --policy")]:
        assert msg in one_line_exit(main, str(tmp_path), "--out", str(tmp_path / "o"), *argv)


def test_dmc_compare_runs_vanilla_dmc_and_policies_in_one_table(tmp_path, capsys):
    import json

    import transformers

    import dmc
    from dmc.eval.compare import main
    from dmc.export import save_folder
    from tests.helpers import drive_mixed_decisions, write_tiny_checkpoint

    vanilla = write_tiny_checkpoint(tmp_path / "tiny")
    model = dmc.retrofit(transformers.AutoModelForCausalLM.from_pretrained(vanilla), dmc.DMCConfig()).eval()
    drive_mixed_decisions(model)
    dmc_dir = save_folder(model, tmp_path / "tiny-dmc", vanilla, dtype="float32")
    control = write_tiny_checkpoint(tmp_path / "tiny-control", seed=1)  # stands in for the LM-only control
    out = tmp_path / "cmp"
    main([str(vanilla), "--control", str(control), "--dmc", str(dmc_dir), "--policies", "h2o", "streaming_llm",
          "--crs", "2", "4", "--tasks", "ppl", "--ppl-blocks", "2", "--ppl-block", "24", "--out", str(out)])
    progress = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[")]
    assert progress[0].startswith("[1/11] tiny (vanilla)")  # a policy's CRs run as one sweep:
    assert progress[-1].startswith("[10-11/11] tiny-control+streaming_llm@2x, tiny-control+streaming_llm@4x (control)")
    results = json.loads((out / "results.json").read_text())["models"]
    policies = [f"{p}@{c}x" for p in ("h2o", "streaming_llm") for c in (2, 4)]
    assert sorted(results) == sorted(["tiny", "tiny-control", "tiny-dmc"] + [f"{base}+{p}" for p in policies
                                                                             for base in ("tiny", "tiny-control")])
    assert results["tiny+h2o@4x"]["tasks"]["ppl"]["realised_cr"] == pytest.approx(4, rel=0.1)
    assert results["tiny-control+h2o@4x"]["role"] == "control" and results["tiny+h2o@4x"]["role"] == "vanilla"
    # the policy runs on the control's weights, not the vanilla model's
    assert results["tiny-control+h2o@4x"]["tasks"]["ppl"]["perplexity"] != results["tiny+h2o@4x"]["tasks"]["ppl"]["perplexity"]
    from dmc.eval.report import family

    assert family("tiny-control+h2o@4x", results["tiny-control+h2o@4x"]) == "h2o (control)"
    assert family("tiny-control", results["tiny-control"]) == "control"
    assert (out / "ppl_vs_cr.png").exists() and "tiny-control+streaming_llm@2x" in (out / "report.md").read_text()
    assert "unknown policy 'lru'" in one_line_exit(main, str(vanilla), "--policies", "lru", "--out", str(out))


# ---- the question-aware setting (compress once, after prefill) ------------------------------------------------
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_question_aware_prefill_is_exact_then_compressed_to_the_prompt_budget(name):
    model = _model("gqa")
    ids = random_ids(2, 29)
    with torch.no_grad():
        want = model(ids).logits
        cache = PolicyCache(model.config, POLICIES[name](Budget(cr=4)), block_size=4, question_aware=True)
        prefill = model(ids[:, :25], past_key_values=cache).logits
        torch.testing.assert_close(prefill, want[:, :25], rtol=1e-9, atol=1e-9)  # nothing evicted while it reads
        for i in range(model.config.num_hidden_layers):
            assert (cache.num_slots(i) == math.ceil(25 / 4)).all()
        for t in range(25, 29):  # decoding: generated tokens go on top of the prompt's budget
            model(ids[:, t:t + 1], past_key_values=cache)
        for i in range(model.config.num_hidden_layers):
            assert (cache.num_slots(i) == math.ceil(25 / 4) + 4).all()


def test_question_aware_tova_keeps_what_the_last_prompt_query_attends_to():
    model = _model("gqa")
    model.config._attn_implementation = "eager"
    ids = random_ids(1, 30, seed=5)
    keep = math.ceil(30 / 3)
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions  # plain Llama attention, full prompt
        cache = PolicyCache(model.config, TOVA(Budget(cr=3)), block_size=4, question_aware=True)
        model(ids, past_key_values=cache)
    for i, layer in enumerate(cache.layers):
        last_query = attentions[i][0, :, -1].mean(0)  # head mean, as TOVA scores
        want = set(last_query.topk(keep).indices.tolist())
        kept = layer.pair_view(layer.pos_pool, -1)[0]  # (H_kv, slots): positions, the same for every head
        assert all(set(row.tolist()) == want for row in kept), f"layer {i}"


def test_question_aware_snapkv_compresses_once_from_one_scoring():
    """SnapKV's protocol: after the prompt, the observation window's pooled scores are computed once and the
    best are kept. Re-scoring after every drop (neighbours change as slots go) would keep 1 instead of 5 here."""
    weights = [0.5, 0.77, 0.09, 0.13, 0.31, 0.63, 0.49, 0.9]  # window attention of each prompt position
    layer = PolicyLayer(1, 4, 4, SnapKV(Budget(tokens=4), window=1, kernel=3), question_aware=True)
    for _ in weights:
        layer.append(torch.randn(1, 1, 4), torch.randn(1, 1, 4), torch.ones(1, dtype=torch.bool))
    layer.hist_pool[..., 0] = torch.tensor(weights)[layer.pos_pool]
    layer.end_prefill()
    pooled = [sum(weights[max(0, i - 1) : i + 2]) / len(weights[max(0, i - 1) : i + 2]) for i in range(7)]
    best = sorted(range(7), key=lambda i: -pooled[i])[:3]  # the window's own token (7) is kept anyway
    assert sorted(layer.pair_view(layer.pos_pool, -1)[0, 0].tolist()) == sorted(best + [7]) == [0, 5, 6, 7]


def test_needle_reports_the_question_aware_setting_for_policies(tmp_path):
    import json

    from dmc.eval.run import main
    from tests.helpers import SMOLLM2, write_tiny_checkpoint

    if not (SMOLLM2 / "config.json").exists():
        pytest.skip("run `make model` first")
    tiny = write_tiny_checkpoint(tmp_path / "tiny")
    main([str(tiny), "--policy", "snapkv", "--budget-cr", "2", "--tasks", "needle", "--needle-contexts", "96",
          "--needle-depths", "0.3", "0.6", "--out", str(tmp_path / "o")])
    needle = json.loads((tmp_path / "o/results.json").read_text())["models"]["tiny+snapkv@2x"]["tasks"]["needle"]
    assert set(needle["question_aware_grid"]) == set(needle["grid"]) == {"96/0.3", "96/0.6"}
    cells = needle["question_aware_grid"].values()
    assert needle["question_aware_accuracy"] == sum(map(float, cells)) / len(cells)
    assert len(needle["question_aware_accuracy_ci95"]) == 2
    assert 1.5 < needle["question_aware_realised_cr"] < needle["realised_cr"] + 0.01  # + the 8 generated tokens
    assert "question_aware_accuracy" in (tmp_path / "o/report.md").read_text()


def test_needle_batches_each_context_length_apart(tmp_path, monkeypatch):
    """A 96-token prompt padded to 192 would cost a 192-token run: cells of one length batch together."""
    from dmc.eval.lm import EvalModel
    from dmc.eval.run import main
    from tests.helpers import SMOLLM2, write_tiny_checkpoint

    if not (SMOLLM2 / "config.json").exists():
        pytest.skip("run `make model` first")
    calls, greedy = [], EvalModel.greedy

    def spy(self, prompts, *args, **kwargs):
        calls.append([len(self.tok(p)["input_ids"]) for p in prompts])
        return greedy(self, prompts, *args, **kwargs)

    monkeypatch.setattr(EvalModel, "greedy", spy)
    tiny = write_tiny_checkpoint(tmp_path / "tiny")
    main([str(tiny), "--tasks", "needle", "--needle-contexts", "96", "192", "--needle-depths", "0.3", "0.6",
          "--batch-size", "8", "--out", str(tmp_path / "o")])
    assert len(calls) == 2 and all(max(c) - min(c) <= 4 for c in calls)  # one call per length, not one mixed


# ---- the dense layout (eval's fast path) against the paged reference --------------------------------------------
def _kept_and_logits(model, layout, policy, ids, mask, pos, question_aware, decode, kv_bits=16):
    cache = PolicyCache(model.config, policy, block_size=4, question_aware=question_aware, layout=layout,
                        kv_bits=kv_bits, kv_group=8)
    T = ids.shape[1]
    logits = [model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits]
    nxt = ids[:, -1:]
    for _ in range(decode):  # decoding on top of the prompt, one token at a time
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        nxt = (nxt * 7 + 3) % model.config.vocab_size
        logits.append(model(nxt, attention_mask=mask, position_ids=pos, past_key_values=cache).logits)
    kept = [layer.pair_view(layer.pos_pool, -1) for layer in cache.layers]
    return torch.cat(logits, 1), kept, [cache.num_slots(i) for i in range(len(cache.layers))], T


def _assert_dense_equals_paged(policy, lengths, question_aware, decode, kv_bits=16):
    """Same logits, same slots in the same order, on a ragged GQA batch with decoding after the prompt."""
    model = _model("gqa")
    _, ids, mask, pos = left_padded_rows(lengths)
    args = (ids, mask, pos, question_aware, decode, kv_bits)
    with torch.no_grad():
        want, want_kept, want_lens, _ = _kept_and_logits(model, "paged", policy, *args)
        got, got_kept, got_lens, _ = _kept_and_logits(model, "dense", policy, *args)
    real = torch.cat([mask, torch.ones(mask.shape[0], decode, dtype=mask.dtype)], 1).bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-9)
    for g, w, gl, wl in zip(got_kept, want_kept, got_lens, want_lens):
        assert torch.equal(gl, wl) and torch.equal(g, w)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_dense_layout_equals_the_paged_reference(name):
    _assert_dense_equals_paged(POLICIES[name](Budget(cr=3)), [23, 11, 2], question_aware=False, decode=5)
    _assert_dense_equals_paged(POLICIES[name](Budget(tokens=5)), [9, 4], question_aware=False, decode=2)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_dense_question_aware_prefill_in_chunks_equals_the_paged_reference(name, monkeypatch):
    """A prompt longer than the policies' 32-step history, in query chunks of 16, then decoding."""
    from dmc.eval.policies.dense import DensePolicyLayer

    monkeypatch.setattr(DensePolicyLayer, "prefill_chunk", 16)
    _assert_dense_equals_paged(POLICIES[name](Budget(cr=3)), [45, 30, 3], question_aware=True, decode=3)


@pytest.mark.parametrize("name", ["h2o", "tova", "streaming_llm"])
@pytest.mark.parametrize("question_aware", [False, True], ids=["agnostic", "question_aware"])
def test_policies_on_codes_dense_equals_the_paged_codes(name, question_aware):
    """A quantised store: the paged layer holds real codes (decoded to attend, or the paged path over codes), the
    dense one the numbers the codes give back; logits and kept slots agree, decisions taken on coded attention."""
    _assert_dense_equals_paged(POLICIES[name](Budget(cr=3)), [23, 11, 2], question_aware, decode=4, kv_bits=4)


def test_a_policy_on_codes_that_keeps_everything_is_keep_all_on_codes():
    """H2O with room for every token (dense, streamed, observing coded attention) = KeepAll on codes (paged, one
    causal pass over round-tripped states): each token sees itself exact and every earlier one from its codes."""
    from dmc.eval.policies import KeepAll

    model = _model("gqa")
    _, ids, mask, pos = left_padded_rows([14, 8, 3])
    with torch.no_grad():
        h2o = _kept_and_logits(model, "dense", H2O(Budget(cr=1)), ids, mask, pos, False, 3, kv_bits=4)[0]
        keep = _kept_and_logits(model, "paged", KeepAll(), ids, mask, pos, False, 3, kv_bits=4)[0]
        exact = _kept_and_logits(model, "paged", KeepAll(), ids, mask, pos, False, 3)[0]
    real = torch.cat([mask, torch.ones(3, 3, dtype=mask.dtype)], 1).bool()
    torch.testing.assert_close(h2o[real], keep[real], rtol=1e-9, atol=1e-9)
    assert (keep[real] - exact[real]).abs().max() > 1e-4  # the codes show
    first = mask.bool() & (pos == 0)  # a sequence's first token sees only itself: exact
    torch.testing.assert_close(keep[:, :14][first], exact[:, :14][first], rtol=1e-9, atol=1e-9)


def test_dense_layout_counts_the_bytes_of_the_paged_one():
    model = _model()
    caches = {layout: PolicyCache(model.config, H2O(Budget(cr=4)), block_size=4, layout=layout)
              for layout in ("paged", "dense")}
    with torch.no_grad():
        for cache in caches.values():
            model(random_ids(2, 37), past_key_values=cache)
    assert caches["dense"].allocated_bytes() == caches["paged"].allocated_bytes() > 0
    coded = {layout: PolicyCache(model.config, H2O(Budget(cr=4)), block_size=4, layout=layout, kv_bits=4, kv_group=8)
             for layout in ("paged", "dense")}
    with torch.no_grad():
        for cache in coded.values():
            model(random_ids(2, 37), past_key_values=cache)
    assert coded["dense"].allocated_bytes() == coded["paged"].allocated_bytes() < caches["paged"].allocated_bytes()
    with pytest.raises(ValueError, match="unknown cache layout 'ring'"):
        PolicyCache(model.config, H2O(Budget(cr=4)), layout="ring")


@pytest.mark.parametrize("kv_bits", [16, 4], ids=["fp", "int4"])
def test_keep_all_stores_a_left_padded_prompt_in_one_pass_as_streaming_would(kv_bits):
    # KeepAll neither evicts nor observes, so its prompt is attended in one causal pass and stored at once
    # (the serving loop's vanilla prefill); it must leave what streaming token by token leaves, on codes too
    from dmc.eval.policies import KeepAll

    model = _model("gqa")
    _, ids, mask, pos = left_padded_rows([11, 6, 9])
    caches, logits = {}, {}
    with torch.no_grad():
        for evicts in (False, True):  # True: the policy claims it may evict, so the prompt streams
            policy = KeepAll()
            object.__setattr__(policy, "evicts", evicts)
            cache = PolicyCache(model.config, policy, block_size=4, kv_bits=kv_bits, kv_group=8)
            first = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache).logits
            nxt = first[:, -1:].argmax(-1)
            mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
            second = model(nxt, attention_mask=mask2, position_ids=pos[:, -1:] + 1, past_key_values=cache).logits
            caches[evicts], logits[evicts] = cache, (first * mask[..., None], second)
    for a, b in zip(logits[False], logits[True]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for one, streamed in zip(caches[False].layers, caches[True].layers):
        assert torch.equal(one.lens, streamed.lens) and torch.equal(one.seen, streamed.seen)
        for pool in ("k_pool", "v_pool", "pos_pool"):
            torch.testing.assert_close(one.pair_view(getattr(one, pool), 0), streamed.pair_view(getattr(streamed, pool), 0),
                                       rtol=0, atol=0)


def test_a_positional_policy_attends_a_prompt_in_one_pass_equal_to_streaming(monkeypatch):
    """StreamingLLM decides by positions alone: the dense layer replays its choices on positions and attends a
    prompt in one pass (no token-by-token attention), with the paged reference's logits and slots in their order;
    per-row budgets (a sweep's rows) too."""
    from dmc.eval.policies import RowBudgets
    from dmc.eval.policies.dense import DensePolicyLayer

    calls = []
    attend = DensePolicyLayer.attend
    monkeypatch.setattr(DensePolicyLayer, "attend", lambda self, *a: calls.append(1) or attend(self, *a))
    _assert_dense_equals_paged(StreamingLLM(Budget(cr=2.5)), [40, 17, 5], question_aware=False, decode=3)
    layers = _model("gqa").config.num_hidden_layers
    assert len(calls) == 3 * layers  # the decoded tokens only
    model = _model("gqa")
    _, ids, mask, pos = left_padded_rows([30, 30, 30])
    rows = StreamingLLM(RowBudgets((2.0, 4.0, 8.0)))
    with torch.no_grad():
        got, got_kept, _, _ = _kept_and_logits(model, "dense", rows, ids, mask, pos, False, 2)
        for b, cr in enumerate((2.0, 4.0, 8.0)):
            want, want_kept, _, _ = _kept_and_logits(model, "paged", StreamingLLM(Budget(cr=cr)), ids[b:b + 1],
                                                     mask[b:b + 1], pos[b:b + 1], False, 2)
            torch.testing.assert_close(got[b:b + 1], want, rtol=1e-9, atol=1e-9)
            for g, w in zip(got_kept, want_kept):  # the batch's rows are as wide as its fullest: -1 beyond
                width = w.shape[-1]
                assert torch.equal(g[b:b + 1, ..., :width], w) and bool((g[b:b + 1, ..., width:] == -1).all())
