"""The quantised slot store (kv_bits 8/4): the open slot exact until it closes, decode attention equal to a
reference that decodes everything, bytes by hand, beams keeping their scales, refusals in one line."""

import pytest
import torch

import dmc
from dmc.cache import DMCLayer
from dmc.ops.kv_quant import CodedPool, error_bound, quantize
from dmc.ops.quant_attention import decode_attention_quant_paged, decode_attention_quant_reference
from tests.helpers import left_padded_rows, mixed_dmc, one_line_exit, random_ids

H_KV, D, BS = 3, 16, 4


def _drive(layers, steps=23, batch=3, seed=0):
    """The same random tokens and decisions into every layer (bits 16 first); row 2 starts late (padding)."""
    g = torch.Generator().manual_seed(seed)
    cos, sin = torch.ones(batch, D, dtype=torch.float64), torch.zeros(batch, D, dtype=torch.float64)
    for t in range(steps):
        k, v = torch.randn(2, batch, H_KV, D, generator=g, dtype=torch.float64) * 3
        omega = torch.rand(batch, H_KV, generator=g, dtype=torch.float64) + 0.1
        merge = torch.rand(batch, H_KV, generator=g) < 0.5
        valid = torch.tensor([True, True, t >= 7])
        for layer in layers:
            layer.step(k, v, omega, merge, valid, cos, sin)
        yield t


@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("window", [None, 3], ids=["unbounded", "window3"])
def test_open_slot_is_exact_and_closed_slots_are_coded_once(bits, window):
    plain, coded = DMCLayer(H_KV, D, BS, window), DMCLayer(H_KV, D, BS, window, kv_bits=bits, kv_group=8)
    for _ in _drive([plain, coded]):
        assert torch.equal(plain.lens, coded.lens)
        b, h = (plain.lens > 0).nonzero(as_tuple=True)
        last = plain.lens[b, h] - 1
        k_plain, v_plain = plain.key_values(b, h, last)
        # the slot merges still write into: bit for bit the unquantised cache's
        assert torch.equal(coded.open_k[b, h], k_plain) and torch.equal(coded.open_v[b, h], v_plain)
    # every closed slot: its final value, coded once (the error of one coding, not of several)
    b, h = (plain.lens > 1).nonzero(as_tuple=True)
    for s in range(int(plain.lens.max()) - 1):
        sel = plain.lens[b, h] - 1 > s
        bb, hh, slot = b[sel], h[sel], torch.full_like(b[sel], s)
        want_k, want_v = plain.key_values(bb, hh, slot)
        got_k, got_v = coded.key_values(bb, hh, slot)
        for want, got in ((want_k, got_k), (want_v, got_v)):
            _, scale, lo = quantize(want, bits, 8)
            assert bool(((got - want).abs() <= error_bound(scale, lo, 8)).all())


def _coded_pool(n_blocks, bits, group, seed, nan_dead=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_blocks, BS, D, generator=g) * torch.linspace(0.1, 4, D)
    codes, scale, lo = quantize(x, bits, group)
    if nan_dead is not None:  # unreferenced / dead slots holding garbage
        scale[nan_dead] = float("nan")
    return CodedPool(codes, scale, lo, bits)


@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("chunk", [1, 3, 256], ids=lambda c: f"chunk{c}")
def test_paged_decode_over_codes_equals_decoding_everything(bits, chunk):
    # ragged GQA batch: a pair with no slots, a pair with only its open slot, pairs without an open slot
    B, H = 3, 6
    lens = torch.tensor([[5, 0, 9], [1, 4, 12], [0, 3, 7]])
    open_live = torch.tensor([[True, True, False], [True, True, True], [False, True, True]])
    width = int(((lens + 1 + BS - 1) // BS).max())
    ids = torch.randperm(B * H_KV * width)
    table = torch.full((B, H_KV, width), -1)
    used = 0
    for b in range(B):
        for h in range(H_KV):
            n = -(-int(lens[b, h] + open_live[b, h]) // BS)
            table[b, h, :n] = ids[used : used + n]
            used += n
    dead = torch.zeros(B * H_KV * width, BS, dtype=torch.bool)
    for b in range(B):
        for h in range(H_KV):
            for s in range(int(lens[b, h]), width * BS):
                if table[b, h, s // BS] >= 0:
                    dead[table[b, h, s // BS], s % BS] = True
    k = _coded_pool(B * H_KV * width, bits, 8, 1)
    v = _coded_pool(B * H_KV * width, bits, 8, 2, nan_dead=dead)  # NaN-filled where no live slot is
    g = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, D, generator=g)
    open_k, open_v = torch.randn(2, B, H_KV, D, generator=g)
    clean_v = CodedPool(v.codes, torch.nan_to_num(v.scale, nan=0.0), v.minimum, bits)
    want = decode_attention_quant_reference(q, k, clean_v, table, lens, open_k, open_v, open_live)
    got = decode_attention_quant_paged(q, k, v, table, lens, open_k, open_v, open_live, chunk=chunk)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[2, :2], torch.zeros(2, D))  # pair (2, 0) holds nothing: 0, not NaN
    # without open slots too (the eviction policies' case)
    torch.testing.assert_close(decode_attention_quant_paged(q, k, v, table, lens, chunk=chunk),
                               decode_attention_quant_reference(q, k, clean_v, table, lens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"int{b}")
def test_bytes_are_codes_scales_and_open_slots_by_hand(bits):
    model = mixed_dmc("gqa", 12, block_size=4, kv_bits=bits, kv_group=8)
    ids = random_ids(2, 40)
    with torch.no_grad():
        cache = dmc.DMCCache(model.config)
        model(ids, past_key_values=cache)
    cfg = model.config
    Dh = cfg.dmc_head_dim
    per_slot = 2 * (Dh * bits // 8 + 2 * (Dh // 8) * 2)  # k and v: codes + fp16 scale and minimum per group
    blocks = sum(int((-(-cache.num_slots(i) // 4)).sum()) for i in range(cfg.num_hidden_layers))
    open_slots = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 2 * Dh * 8  # full precision (float64)
    assert cache.allocated_bytes() == blocks * 4 * per_slot + open_slots
    layer = cache.layer(0)
    pools = ("k_pool", "v_pool", "k_scale", "k_min", "v_scale", "v_min")
    assert layer.pool_bytes() == sum(getattr(layer, n).numel() * getattr(layer, n).element_size() for n in pools)


def test_a_beam_reorder_keeps_codes_scales_and_open_slots_with_their_sequence():
    layer = DMCLayer(H_KV, D, BS, None, kv_bits=4, kv_group=8)
    for _ in _drive([layer]):
        pass
    index = torch.tensor([2, 0, 0, 1])
    before = {(b, h, s): layer.key_values(torch.tensor([b]), torch.tensor([h]), torch.tensor([s]))
              for b in range(3) for h in range(H_KV) for s in range(int(layer.lens[b, h]) - 1)}
    open_before = layer.open_k.clone()
    layer.select_sequences(index)
    for new, old in enumerate(index.tolist()):
        assert torch.equal(layer.open_k[new], open_before[old])
        for h in range(H_KV):
            for s in range(int(layer.lens[new, h]) - 1):
                got = layer.key_values(torch.tensor([new]), torch.tensor([h]), torch.tensor([s]))
                assert all(torch.equal(a, b) for a, b in zip(got, before[(old, h, s)]))


@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"int{b}")
def test_decoding_on_codes_stays_close_to_the_unquantised_cache(bits):
    """Prefill then token by token: the reference and paged backends agree tightly, and both stay near the
    unquantised model (int8 much nearer than int4)."""
    ids = random_ids(2, 30, seed=5)
    logits = {}
    for name, kw in (("fp", {}), ("ref", dict(kv_bits=bits, decode_backend="reference")),
                     ("paged", dict(kv_bits=bits, decode_backend="paged"))):
        model = mixed_dmc("gqa", 12, kv_group=8, **kw)
        with torch.no_grad():
            cache = dmc.DMCCache(model.config)
            outs = [model(ids[:, :10], past_key_values=cache).logits]
            outs += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(10, 30)]
        logits[name] = torch.cat(outs, 1)
    torch.testing.assert_close(logits["paged"], logits["ref"], rtol=1e-9, atol=1e-9)
    err = (logits["paged"] - logits["fp"]).abs().max()
    assert 0 < err < (0.02 if bits == 8 else 0.3) * logits["fp"].abs().max()
    # the prompt's first token sees only its own (open, full-precision) slot
    torch.testing.assert_close(logits["paged"][:, 0], logits["fp"][:, 0], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("window", [None, 12], ids=["unbounded", "window12"])
@pytest.mark.parametrize("split", [1, 9, 24])
def test_one_pass_prefill_on_codes_equals_decoding_on_codes(bits, window, split):
    """The invariant behind every quantised quality figure: a prompt's one-pass logits are what token-by-token
    decoding over the codes gives (closed slots coded, each token's own slot exact), left padding included."""
    _, ids, mask, pos = left_padded_rows([24, 17, 6])
    model = mixed_dmc("gqa", window, kv_bits=bits, kv_group=8)
    with torch.no_grad():
        stepped_cache = dmc.DMCCache(model.config)
        steps = [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                       past_key_values=stepped_cache).logits for t in range(24)]
        cache = dmc.DMCCache(model.config)
        outs = [model(ids[:, :split], attention_mask=mask[:, :split], position_ids=pos[:, :split],
                      past_key_values=cache).logits]
        outs += [model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=pos[:, t : t + 1],
                       past_key_values=cache).logits for t in range(split, 24)]
        fp = model(ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    real = mask.bool()
    got, want = torch.cat(outs, 1)[real], torch.cat(steps, 1)[real]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert (got - fp[real]).abs().max() > 1e-6  # the codes do show (a prefill in full precision would not)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(cache.num_slots(layer), stepped_cache.num_slots(layer))


def test_quantised_prefill_attention_is_the_reference_when_codes_are_exact():
    """With the coded states equal to the exact ones, the two-set attention is train_attention's reference."""
    from dmc.ops.quant_prefill import prefill_attention_quant
    from dmc.ops.train_attention import MASKED, train_attention_reference

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 11, D, generator=g, dtype=torch.float64)
    k, v = torch.randn(2, 2, 3, 11, D, generator=g, dtype=torch.float64)
    keep_log = torch.where(torch.rand(2, 3, 11, generator=g) < 0.4, MASKED, -torch.rand(2, 3, 11, generator=g))
    keep_log = keep_log.double()
    want = train_attention_reference(q, k, v, keep_log)
    torch.testing.assert_close(prefill_attention_quant(q, k, v, k, v, keep_log), want, rtol=1e-12, atol=1e-12)
    # coded states off the diagonal only: query 0 sees nothing but itself
    noisy = prefill_attention_quant(q, k, v, k + 1, v + 1, keep_log)
    torch.testing.assert_close(noisy[:, :, 0], want[:, :, 0], rtol=1e-12, atol=1e-12)
    assert (noisy[:, :, 1:] - want[:, :, 1:]).abs().max() > 1e-3


def test_bad_kv_bits_and_backends_without_a_quantised_path_are_one_line():
    with pytest.raises(dmc.DMCConfigError, match=r"dmc_kv_bits=3 is invalid: choose one of 16, 8, 4"):
        dmc.DMCConfig(kv_bits=3)
    model = mixed_dmc("gqa", 12, kv_bits=4, kv_group=8, decode_backend="sdpa")
    with torch.no_grad(), pytest.raises(ValueError, match="has no path over a 4-bit cache; use one of auto, paged"):
        model.generate(random_ids(1, 5), max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("method", ["dmc", "dms"])
def test_dmc_generate_takes_kv_bits_and_reports_fewer_bytes(folders, capsys, method):
    from dmc.generate import main

    vanilla, folder = folders[0], folders[1 if method == "dmc" else 2]
    mib = {}
    for bits in (16, 4):
        main([str(folder), "--prompt", "def add(a, b):", "--max-new-tokens", "20", "--kv-bits", str(bits)])
        tail = capsys.readouterr().out.strip().splitlines()[-1]
        assert tail.endswith(f" bytes, {bits}-bit slots)"), tail
        mib[bits] = int(tail.split("(")[1].split(" bytes")[0].replace(",", ""))
    assert 0 < mib[4] < mib[16]
    assert one_line_exit(main, str(folder), "--prompt", "x", "--kv-bits", "3") == \
        "dmc generate: error: --kv-bits 3: choose one of 16, 8, 4"
    assert "needs a DMC or DMS folder" in one_line_exit(main, str(vanilla), "--prompt", "x", "--kv-bits", "8")
