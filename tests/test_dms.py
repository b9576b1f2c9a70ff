"""The defining invariants of a DMS (delayed eviction) model, on tiny random Llamas (MHA and GQA)."""

from __future__ import annotations

import pytest
import torch

import dmc
from dmc.dms_cache import DMSCache
from tests.helpers import left_padded_rows, random_ids, tiny_llama

KINDS = ["mha", "gqa"]


GATES = ["adapter", "channel"]


def mixed_dms(kind="gqa", window=3, dtype=torch.float64, seed=1, tau=0.1, gate="adapter"):
    """Random gates with no offset: roughly half the tokens flagged, logits far from the 0 boundary. The channel
    gate reads the random model's own query channel."""
    model = dmc.retrofit(tiny_llama(kind, dtype), dmc.DMSConfig(window=window, gate_offset=0.0, tau=tau, gate=gate))
    if gate == "channel":
        return model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.dms_gate.proj.weight
            w.copy_(torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.1)
        for layer in model.model.layers:
            layer.dms_gate.offset = 0.0
    return model.eval()


class FixedGates:
    """Every layer's gate returns given token decisions (B, H_kv, T) bool, a chunk at a time as the model reads
    them (a hand-built sequence)."""

    def __init__(self, model, decisions: torch.Tensor):
        self.decisions, self.at = decisions, 0
        for layer in model.model.layers:
            layer.dms_gate.forward = self.logits

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        d = self.decisions[..., self.at : self.at + x.shape[1]]
        return torch.where(d, 10.0, -10.0).to(torch.float32)

    def advance(self, T: int) -> None:
        self.at += T


def run_chunks(model, ids, sizes, mask=None, gates: FixedGates | None = None):
    """Feed ``ids`` to one cache in chunks of ``sizes`` tokens: (logits (B, T, V), cache)."""
    cache, outs, start = DMSCache(model.config), [], 0
    for n in sizes:
        part = ids[:, start : start + n]
        m = None if mask is None else mask[:, : start + n]
        with torch.no_grad():
            out = model(part, attention_mask=m, past_key_values=cache, use_cache=True)
        if gates is not None:
            gates.advance(n)
        outs.append(out.logits)
        start += n
    return torch.cat(outs, 1), cache


def expected_held(flags_of_token: list[bool], window: int) -> list[int]:
    """Brute force: after n tokens, token j is held unless token j + 1 flagged it and it is more than ``window``
    behind the last token."""
    n = len(flags_of_token)
    return [j for j in range(n) if not (j + 1 < n and flags_of_token[j + 1] and (n - 1) - j > window)]


# ---- the method disabled, and at initialisation ----------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tie", [False, True])
def test_kill_switch_equals_vanilla_exactly(kind, tie):
    vanilla = tiny_llama(kind, tie=tie)
    ids = random_ids(2, 19)
    model = dmc.retrofit(tiny_llama(kind, tie=tie), dmc.DMSConfig(enabled=False))
    assert torch.equal(model(ids).logits, vanilla(ids).logits)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False),
                       vanilla.generate(ids, max_new_tokens=5, do_sample=False))


@pytest.mark.parametrize("kind", KINDS)
def test_gate_at_initialisation_equals_vanilla(kind):
    """Zero gates: every logit is -offset, nothing is flagged, and the model is the vanilla one, in the eval
    forward, in training (noise drawn: P(flag) = sigmoid(-5) per token is not zero, so noise off) and cached."""
    vanilla = tiny_llama(kind, dtype=torch.float64)
    model = dmc.retrofit(tiny_llama(kind, dtype=torch.float64), dmc.DMSConfig(window=2))
    ids = random_ids(2, 23)
    want = vanilla(ids).logits
    out = model(ids, use_cache=False)
    assert int(out.dms_evicted.sum()) == 0
    torch.testing.assert_close(out.logits, want, rtol=1e-10, atol=1e-10)
    cached, cache = run_chunks(model, ids, [9, 1, 1, 12])
    torch.testing.assert_close(cached, want, rtol=1e-10, atol=1e-10)
    assert all(bool((cache.num_slots(i) == 23).all()) for i in range(len(cache.layers)))
    assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False),
                       vanilla.generate(ids, max_new_tokens=6, do_sample=False))


# ---- the paper's channel gate: stage 1, the handover, the channel it reads ------------------------------------
def channel_rows(model) -> torch.Tensor:
    """q_proj rows of the decision channel: the last channel of each KV group's first query head."""
    c = model.config
    D, groups = c.hidden_size // c.num_attention_heads, c.num_attention_heads // c.num_key_value_heads
    return torch.arange(c.num_key_value_heads) * groups * D + D - 1


def scaled_rows(vanilla, rows, factor):
    with torch.no_grad():
        for layer in vanilla.model.layers:
            layer.self_attn.q_proj.weight[rows] *= factor
    return vanilla


@pytest.mark.parametrize("kind", KINDS)
def test_channel_gate_stage1_fades_the_channel_and_the_handover_evicts_nothing(kind):
    """Stage 1 at multiplier m is the vanilla model with the decision rows scaled by m (m = 1: the vanilla model),
    evicting nothing (noise drawn or not); after the rows are zeroed the model evicts nothing and equals the vanilla
    model with those rows zeroed, in the eval forward, the training forward and on the cache."""
    ids = random_ids(2, 23)
    model = dmc.retrofit(tiny_llama(kind, torch.float64), dmc.DMSConfig(window=2, gate="channel"))
    rows = channel_rows(model)
    assert [r for _, r in model.decision_rows()][0].tolist() == rows.tolist()
    for m in (1.0, 0.3):
        model.set_stage1_multiplier(m)
        want = scaled_rows(tiny_llama(kind, torch.float64), rows, m)(ids).logits
        for train in (False, True):
            out = model.train(train)(ids, use_cache=False)
            assert int(out.dms_evicted.sum()) == 0
            torch.testing.assert_close(out.logits, want, rtol=1e-10, atol=1e-10)
    model.set_stage1_multiplier(None)
    model.zero_decision_rows()
    want = scaled_rows(tiny_llama(kind, torch.float64), rows, 0.0)(ids).logits
    model.set_logistic_noise(False)  # logit -5 everywhere: noise above 5 (P = sigmoid(-5) a token) would flag
    out = model.train()(ids, use_cache=False)
    assert int(out.dms_evicted.sum()) == 0
    torch.testing.assert_close(out.logits, want, rtol=1e-10, atol=1e-10)
    cached, cache = run_chunks(model.eval(), ids, [9, 1, 1, 12])
    torch.testing.assert_close(cached, want, rtol=1e-10, atol=1e-10)
    assert all(bool((cache.num_slots(i) == 23).all()) for i in range(len(cache.layers)))


@pytest.mark.parametrize("kind", KINDS)
def test_channel_gate_reads_its_channel_and_attention_no_longer_does(kind):
    """Decisions are the decision channel's pre-RoPE query (scale * q - offset > 0), brute-forced from q_proj's
    output: the cache holds exactly the tokens they imply. With an offset no query reaches, nothing is evicted and
    the model is the vanilla one with the decision rows zeroed: attention does not read the channel."""
    model = mixed_dms(kind, window=2, gate="channel")
    c = model.config
    D, groups = c.hidden_size // c.num_attention_heads, c.num_attention_heads // c.num_key_value_heads
    ids = random_ids(2, 20)
    seen = {}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda mod, a, out, i=i: seen.__setitem__(i, out))
             for i, layer in enumerate(model.model.layers)]
    _, cache = run_chunks(model, ids, [20])
    for h in hooks:
        h.remove()
    for i in range(c.num_hidden_layers):
        q = seen[i].view(2, 20, -1, D)[:, :, ::groups, -1]  # (B, T, H_kv)
        flags = q * c.dms_gate_scale - c.dms_gate_offset > 0
        for b in range(2):
            for h in range(c.num_key_value_heads):
                assert cache.layer(i).positions(b, h) == expected_held(flags[b, :, h].tolist(), 2)
    assert 0 < int(model(ids, use_cache=False).dms_evicted.sum())  # the check is about evictions, so there are some
    model.config.dms_gate_offset = 1e9
    want = scaled_rows(tiny_llama(kind, torch.float64), channel_rows(model), 0.0)(ids).logits
    out = model(ids, use_cache=False)
    assert int(out.dms_evicted.sum()) == 0
    torch.testing.assert_close(out.logits, want, rtol=1e-10, atol=1e-10)


def test_the_channel_gate_has_no_gate_parameters():
    model = dmc.retrofit(tiny_llama("gqa"), dmc.DMSConfig(gate="channel"))
    assert all(layer.dms_gate is None for layer in model.model.layers)
    assert not any("dms_gate" in name for name, _ in model.named_parameters())
    with pytest.raises(ValueError, match="model.trainable: all"):
        model.gate_parameters()
    with pytest.raises(ValueError, match="dms_gate='channel'"):
        dmc.retrofit(tiny_llama("gqa"), dmc.DMSConfig()).set_stage1_multiplier(0.5)


# ---- one computation, three ways -------------------------------------------------------------------------------
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [1, 3, 40])
def test_training_forward_equals_eval_equals_decoding(kind, window, gate):
    """Hard decisions: the training forward with noise off and a tiny temperature, the eval forward, and decoding
    token by token on the cache give the same logits."""
    model = mixed_dms(kind, window=window, tau=1e-6, gate=gate)
    ids = random_ids(2, 24)
    with torch.no_grad():
        evald = model(ids, use_cache=False)
        model.train()
        model.set_logistic_noise(False)
        trained = model(ids, use_cache=False)
        model.eval()
    assert 0 < int(evald.dms_evicted.sum()) or window >= 24  # the check is about evictions, so there are some
    torch.testing.assert_close(trained.logits, evald.logits, rtol=1e-9, atol=1e-9)
    decoded, _ = run_chunks(model, ids, [1] * 24)
    torch.testing.assert_close(decoded, evald.logits, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("window", [1, 4, 50])
@pytest.mark.parametrize("bits", [16, 8, 4], ids=lambda b: f"{b}bit")
def test_chunked_prefill_equals_one_pass_equals_decoding(kind, window, bits, gate):
    """On full-precision slots and on codes (every query reads each key and value as its codes give it back, its own
    included, so every path sees the same numbers)."""
    model = mixed_dms(kind, window=window, gate=gate)
    model.config.dms_kv_bits, model.config.dms_kv_group = bits, 8 if bits < 16 else None  # read by every new cache
    ids = random_ids(3, 30)
    one, one_cache = run_chunks(model, ids, [30])
    chunked, chunk_cache = run_chunks(model, ids, [7, 1, 11, 1, 10])
    decoded, dec_cache = run_chunks(model, ids, [1] * 30)
    torch.testing.assert_close(chunked, one, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(decoded, one, rtol=1e-9, atol=1e-9)
    assert one_cache.layer(0).quantized == (bits < 16)
    assert bits == 16 or one_cache.layer(0).k_pool.dtype == torch.uint8  # codes, not numbers, are held
    for i in range(model.config.num_hidden_layers):
        for b in range(3):
            for h in range(model.config.num_key_value_heads):
                held = one_cache.layer(i).positions(b, h)
                assert chunk_cache.layer(i).positions(b, h) == held
                assert dec_cache.layer(i).positions(b, h) == held


def test_the_eval_count_is_the_cache():
    """The forward's eviction count (window counted) is what the cache holds after the same tokens."""
    model = mixed_dms("gqa", window=3)
    ids = random_ids(2, 26)
    out = model(ids, use_cache=False)
    _, cache = run_chunks(model, ids, [26])
    for i in range(model.config.num_hidden_layers):
        assert torch.equal(cache.num_slots(i), 26 - out.dms_evicted[i])


# ---- the cache holds exactly what the decisions imply ----------------------------------------------------------
@pytest.mark.parametrize("window", [1, 2, 5, 100])
@pytest.mark.parametrize("sizes", [[17], [1] * 17, [4, 1, 6, 6]])
def test_cache_holds_exactly_the_implied_tokens(window, sizes):
    model = dmc.retrofit(tiny_llama("gqa", dtype=torch.float64), dmc.DMSConfig(window=window)).eval()
    B, H, T = 2, model.config.num_key_value_heads, 17
    g = torch.Generator().manual_seed(window)
    decisions = torch.rand(B, H, T, generator=g) < 0.6
    gates = FixedGates(model, decisions)
    run = run_chunks(model, random_ids(B, T), sizes, gates=gates)[1]
    for i in range(model.config.num_hidden_layers):
        layer = run.layer(i)
        for b in range(B):
            for h in range(H):
                want = expected_held(decisions[b, h].tolist(), window)
                assert layer.positions(b, h) == want
                assert int(layer.lens[b, h]) == len(want)


def test_a_hand_built_sequence():
    """Window 2, flags from tokens 2, 3 and 6 (about tokens 1, 2 and 5): after 8 tokens, 1 and 2 are gone (more
    than 2 behind token 7), 5 is not yet."""
    model = dmc.retrofit(tiny_llama("mha", dtype=torch.float64), dmc.DMSConfig(window=2)).eval()
    d = torch.zeros(1, 4, 8, dtype=torch.bool)
    d[..., [2, 3, 6]] = True
    d[:, 0, 0] = True  # the first token has no predecessor: its decision is ignored
    cache = run_chunks(model, random_ids(1, 8), [8], gates=FixedGates(model, d))[1]
    assert cache.layer(0).positions(0, 0) == [0, 3, 4, 5, 6, 7]
    assert cache.layer(1).positions(0, 3) == [0, 3, 4, 5, 6, 7]


def test_left_padding_counts_real_tokens_only():
    """Ragged left-padded prompts give each row what it gets alone (positions among its real tokens), and the
    one-pass, chunked and decoded caches agree."""
    model = mixed_dms("gqa", window=2)
    rows, ids, mask, pos = left_padded_rows([9, 14, 5])
    cache = DMSCache(model.config)
    more = random_ids(3, 4, seed=7)
    with torch.no_grad():  # positions as generate() gives them: RoPE tables are fp32, so they must match
        batch = model(ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True).logits
        step = model(more, attention_mask=torch.cat([mask, torch.ones(3, 4, dtype=mask.dtype)], 1),
                     position_ids=pos[:, -1:] + 1 + torch.arange(4), past_key_values=cache, use_cache=True).logits
    for r, row in enumerate(rows):
        alone, alone_cache = run_chunks(model, torch.cat([row[None], more[r : r + 1]], 1), [len(row), 4])
        n = len(row)
        torch.testing.assert_close(batch[r, -n:], alone[0, :n], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(step[r], alone[0, n:], rtol=1e-9, atol=1e-9)
        for i in range(model.config.num_hidden_layers):
            for h in range(model.config.num_key_value_heads):
                assert cache.layer(i).positions(r, h) == alone_cache.layer(i).positions(0, h)


def test_memory_is_really_freed():
    """A long decode at a high eviction rate: the slots a pair holds stay near window + kept, and the blocks in use
    follow them (an evicted slot is reused by the token arriving as it leaves)."""
    model = dmc.retrofit(tiny_llama("mha", dtype=torch.float64), dmc.DMSConfig(window=4, block_size=4)).eval()
    T = 64
    d = torch.ones(1, 4, T, dtype=torch.bool)  # every token flags its predecessor
    cache = run_chunks(model, random_ids(1, T), [8] + [1] * (T - 8), gates=FixedGates(model, d))[1]
    layer = cache.layer(0)
    assert layer.positions(0, 2) == list(range(T - 5, T))  # the window and the newest token
    assert int(layer.lens.max()) == 5
    assert layer.allocated_bytes() == 4 * 2 * layer.block_bytes()  # 4 pairs x 2 blocks of 4 slots


# ---- generate(), multi-turn, beam search ----------------------------------------------------------------------
def test_generate_and_multi_turn_match_the_one_pass_forward():
    """generate() on the cache, then a second turn (a prompt after generation, in one chunk) and more generation:
    every step's logits equal the one-pass forward over the whole conversation."""
    model = mixed_dms("gqa", window=3)
    ids = random_ids(2, 12)
    first = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    turn = random_ids(2, 5, seed=3)
    convo = torch.cat([first.sequences, turn], 1)
    second = model.generate(convo, past_key_values=first.past_key_values, max_new_tokens=4, do_sample=False,
                            output_logits=True, return_dict_in_generate=True)
    full = model(second.sequences, use_cache=False).logits
    for i, step in enumerate(second.logits):
        torch.testing.assert_close(step, full[:, convo.shape[1] - 1 + i].float(), rtol=1e-5, atol=1e-5)


def test_beam_search_runs_on_the_cache():
    model = mixed_dms("gqa", window=2)
    out = model.generate(random_ids(2, 9), max_new_tokens=4, num_beams=3, do_sample=False)
    assert out.shape == (2, 13)


# ---- training -------------------------------------------------------------------------------------------------
def test_the_relaxed_bias_reaches_the_gates():
    """In training, keys past the window carry log(1 - alpha~): the logits' gradient reaches every gate, and the CR
    term (dms_alpha) has one too."""
    model = mixed_dms("gqa", window=2)
    model.train()
    out = model(random_ids(2, 16), use_cache=False)
    (out.logits.square().mean() + out.dms_alpha.sum()).backward()
    for layer in model.model.layers:
        assert layer.dms_gate.proj.weight.grad.abs().sum() > 0


def test_window_longer_than_the_block_evicts_nothing():
    model = mixed_dms("gqa", window=40)
    out = model(random_ids(2, 20), use_cache=False)
    assert int(out.dms_evicted.sum()) == 0 and float(out.dms_alpha.detach().abs().sum()) == 0


# ---- bad input ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, words", [
    ("window", 0, "must be >= 1"), ("window", -3, "must be >= 1"), ("target_cr", 0.5, "must be >= 1"),
    ("kv_bits", 3, "choose one of 16, 8, 4"), ("kv_group", 0, "positive number"), ("gate", "neuron", "choose one of")])
def test_bad_settings_are_one_line(field, value, words):
    with pytest.raises(dmc.DMSConfigError, match=words) as err:
        dmc.DMSConfig(**{field: value})
    assert "\n" not in str(err.value) and f"dms_{field}" in str(err.value)


def test_a_dmc_cache_is_refused():
    model = mixed_dms("gqa")
    with pytest.raises(dmc.DMCCacheError, match="needs a DMSCache"):
        model(random_ids(1, 4), past_key_values=dmc.DMCCache(model.config), use_cache=True)


# ---- the attention kernels against the reference -----------------------------------------------------------------
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("B, H, H_kv, T, D, window", [(2, 6, 2, 37, 16, 5), (1, 4, 4, 9, 8, 1), (3, 3, 1, 20, 32, 25)])
def test_eviction_attention_matches_the_reference(backend, B, H, H_kv, T, D, window):
    """Random relaxed decisions over left-padded rows: forward and the gradients of q, k, v and the gate logits
    (FlexAttention has no backward on CPU: its forward only there)."""
    from dmc.ops.eviction_attention import EVICTION_ATTENTION, relaxed_evictions

    grad = backend != "flex"
    g = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64, requires_grad=grad) for h in (H, H_kv, H_kv))
    logit = (torch.randn(B, H_kv, T, generator=g, dtype=torch.float64) * 3).requires_grad_(grad)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[0, :3] = False
    outs = []
    for name in ("reference", backend):
        dec = relaxed_evictions(logit, valid, tau=0.5, noise=False)
        out = EVICTION_ATTENTION[name](q, k, v, dec.key_log, dec.flag_log, window)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=out.dtype)
        loss = (out * weight)[valid[:, None, :, None].expand_as(out)].sum()
        grads = torch.autograd.grad(loss, (q, k, v, logit)) if grad else ()
        outs.append((out[valid[:, None, :, None].expand_as(out)], *grads))
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)


def test_reserved_bytes_are_the_pools_and_each_caches_side_state():
    """`dmc bench`'s reserved bytes: the pools as reserved plus what each cache keeps beside them (DMS: positions and
    rings; DMC: the open slots' running sums and merge ring; a policy: positions, scores, history)."""
    from dmc.eval.policies import H2O, Budget, PolicyCache, policy_attention
    from tests.helpers import mixed_dmc

    nbytes = lambda *ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    ids = random_ids(2, 20)
    dms = mixed_dms("gqa", window=3)
    dmc_model = mixed_dmc("gqa", window=4)
    vanilla = tiny_llama("gqa", dtype=torch.float64)
    caches = [dmc.DMSCache(dms.config), dmc.DMCCache(dmc_model.config),
              PolicyCache(vanilla.config, H2O(Budget(cr=2)))]
    with torch.no_grad():
        dms(ids, past_key_values=caches[0], use_cache=True)
        dmc_model(ids, past_key_values=caches[1], use_cache=True)
        with policy_attention(vanilla):
            vanilla(ids, past_key_values=caches[2], use_cache=True)
    sides = [lambda x: nbytes(x.pos_pool, x.ring_slot, x.ring_flag),
             lambda x: nbytes(x.k_sum, x.v_sum, x.w_sum, x.ring_k, x.ring_v, x.ring_w),
             lambda x: nbytes(x.pos_pool, x.score_pool, x.hist_pool)]
    for cache, side in zip(caches, sides):
        layer = cache.layer(0)
        assert layer.reserved_bytes() == layer.pool_bytes() + side(layer) > layer.allocated_bytes() > 0
