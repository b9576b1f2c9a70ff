"""The defining invariants of a DMC model, on tiny random Llamas (MHA and GQA)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import dmc
from tests.helpers import drive_mixed_decisions, left_padded_rows, mixed_dmc, random_ids, tiny_llama

KINDS = ["mha", "gqa"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tie", [False, True])
def test_kill_switch_equals_vanilla_exactly(kind, tie):
    vanilla = tiny_llama(kind, tie=tie)
    ids = random_ids(2, 19)
    expected = vanilla(ids).logits
    model = dmc.retrofit(tiny_llama(kind, tie=tie), dmc.DMCConfig(enabled=False))
    assert torch.equal(model(ids).logits, expected)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                       vanilla.generate(ids, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("kind", KINDS)
def test_alpha_zero_equals_vanilla(kind):
    """Decision rows zeroed (end of stage 1): every token appends, and the model is the vanilla one."""
    vanilla = tiny_llama(kind, dtype=torch.float64)
    model = dmc.retrofit(tiny_llama(kind, dtype=torch.float64), dmc.DMCConfig())
    model.zero_decision_rows()
    vanilla.load_state_dict(model.state_dict())
    ids = random_ids(2, 23)
    out = model(ids, use_cache=False)
    assert int(out.dmc_merges.sum()) == 0
    torch.testing.assert_close(out.logits, vanilla(ids).logits, rtol=1e-10, atol=1e-10)


def test_hidden_states_are_llamas_and_attentions_are_refused():
    """output_hidden_states as Llama gives them (embeddings, each layer, the last normed); with alpha = 0 they
    equal the vanilla model's. Attention weights over merged slots have no per-token meaning: one clear error."""
    vanilla = tiny_llama("gqa", dtype=torch.float64)
    model = dmc.retrofit(tiny_llama("gqa", dtype=torch.float64), dmc.DMCConfig())
    model.zero_decision_rows()
    vanilla.load_state_dict(model.state_dict())
    ids = random_ids(2, 11)
    got = model(ids, use_cache=False, output_hidden_states=True).hidden_states
    want = vanilla(ids, output_hidden_states=True).hidden_states
    assert len(got) == model.config.num_hidden_layers + 1
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert model(ids, use_cache=False).hidden_states is None
    mixed = mixed_dmc("gqa")
    with torch.no_grad():
        assert len(mixed.eval()(ids, output_hidden_states=True).hidden_states) == mixed.config.num_hidden_layers + 1
    with pytest.raises(ValueError, match="output_attentions has no per-token meaning"):
        model(ids, output_attentions=True)


@pytest.mark.parametrize("kind", KINDS)
def test_stage1_multiplier_one_is_vanilla(kind):
    vanilla = tiny_llama(kind, dtype=torch.float64)
    model = dmc.retrofit(tiny_llama(kind, dtype=torch.float64), dmc.DMCConfig())
    ids = random_ids(2, 17)
    model.set_stage1_multiplier(1.0)
    torch.testing.assert_close(model(ids, use_cache=False).logits, vanilla(ids).logits, rtol=1e-10, atol=1e-10)
    model.set_stage1_multiplier(0.0)  # channel c fully off == decision rows zeroed
    faded = model(ids, use_cache=False).logits
    model.zero_decision_rows()
    model.set_stage1_multiplier(1.0)
    torch.testing.assert_close(model(ids, use_cache=False).logits, faded, rtol=1e-10, atol=1e-10)


def _expected_slots(out, layer):
    return out.dmc_tokens[:, None] - out.dmc_merges[layer]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [None, 3, 12])
def test_token_by_token_decoding_equals_parallel_forward(kind, window):
    model = mixed_dmc(kind, window)
    ids = random_ids(2, 29)
    with torch.no_grad():
        full = model(ids, use_cache=False)
        frac = full.dmc_merges.sum() / (full.dmc_merges.numel() * ids.shape[1])
        assert 0.2 < frac < 0.8, "decisions should be mixed"
        cache = dmc.DMCCache(model.config)
        steps = [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(ids.shape[1])]
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, rtol=1e-9, atol=1e-9)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(cache.num_slots(layer), _expected_slots(full, layer))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [None, 12])
@pytest.mark.parametrize("split", [1, 8, 20])
def test_one_pass_prefill_then_decoding_equals_parallel_forward(kind, window, split):
    model = mixed_dmc(kind, window)
    ids = random_ids(3, 24, seed=2)
    with torch.no_grad():
        full = model(ids, use_cache=False)
        cache = dmc.DMCCache(model.config)
        outs = [model(ids[:, :split], past_key_values=cache)]
        outs += [model(ids[:, t : t + 1], past_key_values=cache) for t in range(split, ids.shape[1])]
    torch.testing.assert_close(torch.cat([o.logits for o in outs], 1), full.logits, rtol=1e-9, atol=1e-9)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(cache.num_slots(layer), _expected_slots(full, layer))
        # the merges each forward reports (prefill, then every decoded token) add up to the cache's slots
        assert torch.equal(sum(_expected_slots(o, layer) for o in outs), cache.num_slots(layer))


@pytest.mark.parametrize("backend", ["reference", "sdpa", "paged"])
@pytest.mark.parametrize("window", [None, 12])
def test_every_portable_decode_backend_equals_parallel_forward(backend, window):
    """Left-padded GQA batch with a 1-token prompt, prefill then decoding, through each backend."""
    model = mixed_dmc("gqa", window, decode_backend=backend)
    ids = random_ids(3, 21, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :13], mask[2, :20] = 0, 0  # row 2's prompt is its single last prompt token
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False)
        cache = dmc.DMCCache(model.config, block_size=3)
        first = model(ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6], past_key_values=cache).logits
        rest = [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                      past_key_values=cache).logits for t in range(6, ids.shape[1])]
    real = mask.bool()
    torch.testing.assert_close(torch.cat([first] + rest, 1)[real], full.logits[real], rtol=1e-9, atol=1e-9)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(cache.num_slots(layer), _expected_slots(full, layer))


def test_multi_token_chunk_after_prefill():
    model = mixed_dmc("gqa", 12)
    ids = random_ids(2, 20)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = dmc.DMCCache(model.config)
        a = model(ids[:, :7], past_key_values=cache).logits
        b = model(ids[:, 7:15], past_key_values=cache).logits  # chunk with a past: token-by-token path
        c = model(ids[:, 15:], past_key_values=cache).logits
    torch.testing.assert_close(torch.cat([a, b, c], 1), full, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [None, 12])
def test_left_padded_batch(kind, window):
    model = mixed_dmc(kind, window)
    lengths = [17, 9, 1]
    rows, ids, mask, pos = left_padded_rows(lengths)
    T = max(lengths)
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
        for i, r in enumerate(rows):  # each row alone, unpadded
            alone = model(r[None], use_cache=False).logits[0]
            torch.testing.assert_close(padded[i, T - len(r):], alone, rtol=1e-9, atol=1e-9)
        cache = dmc.DMCCache(model.config)
        first = model(ids[:, :10], attention_mask=mask[:, :10], position_ids=pos[:, :10], past_key_values=cache).logits
        rest = [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                      past_key_values=cache).logits for t in range(10, T)]
        stepped = torch.cat([first] + rest, 1)
        for i, r in enumerate(rows):
            torch.testing.assert_close(stepped[i, T - len(r):], padded[i, T - len(r):], rtol=1e-9, atol=1e-9)
        full = model(ids, attention_mask=mask, position_ids=pos, use_cache=False)
        for layer in range(model.config.num_hidden_layers):
            assert torch.equal(cache.num_slots(layer), _expected_slots(full, layer))


@pytest.mark.parametrize("kind", KINDS)
def test_generate_uses_dmc_cache_and_matches_unbatched(kind):
    model = mixed_dmc(kind, 12, dtype=torch.float32)
    a, b = random_ids(1, 12, seed=3), random_ids(1, 5, seed=4)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = (torch.arange(12) >= torch.tensor([[0], [7]])).long()
    model.generation_config.eos_token_id = None  # compare all 6 new tokens
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.past_key_values, dmc.DMCCache)
    assert out.sequences.shape == (2, 18)
    assert torch.equal(out.sequences[0, 12:], model.generate(a, max_new_tokens=6, do_sample=False)[0, 12:])
    assert torch.equal(out.sequences[1, 12:], model.generate(b, max_new_tokens=6, do_sample=False)[0, 5:])


def test_cache_memory_follows_slots():
    model = mixed_dmc("gqa", 12, block_size=4)
    ids = random_ids(2, 40)
    with torch.no_grad():
        cache = dmc.DMCCache(model.config)
        model(ids, past_key_values=cache)
    cfg = model.config
    per_slot = 2 * cfg.dmc_head_dim * 8  # k and v, float64
    blocks = sum(int((-(-cache.num_slots(i) // 4)).sum()) for i in range(cfg.num_hidden_layers))
    assert cache.allocated_bytes() == blocks * 4 * per_slot
    vanilla_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 40 * per_slot
    assert cache.allocated_bytes() < vanilla_bytes


def test_beam_search_on_the_compressed_cache_equals_beam_search_recomputing_every_step():
    # Without a cache every beam step re-runs the whole sequence (the eval forward, equal to decoding), so a
    # cache that does not follow the beams' reordering gives other beams and scores.
    model = mixed_dmc("gqa", 12, dtype=torch.float64)
    ids = random_ids(2, 8)
    kw = dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, do_sample=False, output_scores=True,
              return_dict_in_generate=True, length_penalty=0.0)
    cached = model.generate(ids, use_cache=True, **kw)
    recomputed = model.generate(ids, use_cache=False, **kw)
    assert type(cached.past_key_values).__name__ == "DMCCache"
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(cached.sequences_scores, recomputed.sequences_scores)


def test_training_mode_gradients_reach_decision_rows():
    model = mixed_dmc("gqa", 12, dtype=torch.float32)
    model.train()
    ids = random_ids(2, 16)
    out = model(ids, labels=ids, use_cache=False)
    assert out.dmc_alpha.shape == (2,) and out.dmc_alpha.requires_grad
    (out.loss + dmc.cr_loss(out.dmc_alpha, 4.0)).backward()
    D, c = model.config.dmc_head_dim, model.config.dmc_channel_index
    k_rows = model.model.layers[0].self_attn.k_proj.weight.grad[c::D]
    q_rows = model.model.layers[0].self_attn.q_proj.weight.grad[c::D]
    assert k_rows.abs().sum() > 0 and q_rows.abs().sum() > 0


def test_gumbel_noise_in_training_only():
    model = mixed_dmc("gqa", 12, dtype=torch.float32)
    ids = random_ids(1, 16)
    with torch.no_grad():
        assert torch.equal(model(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
        model.train()
        assert not torch.equal(model(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_registered_with_auto_classes(tmp_path):
    model = mixed_dmc("gqa", 12, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "dmc_llama" and config.dmc_window == 12
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, dmc.DMCLlamaForCausalLM)
    ids = random_ids(1, 10)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_retrofit_keeps_dtype_and_device():
    model = dmc.retrofit(tiny_llama("gqa", dtype=torch.bfloat16), dmc.DMCConfig())
    assert next(model.parameters()).dtype == torch.bfloat16
    drive_mixed_decisions(model)
    with torch.no_grad():
        out = model(random_ids(1, 9), use_cache=False)
    assert torch.isfinite(out.logits).all()
