import pytest
import torch

from dmc.ops.decode_attention import (
    decode_attention_flash,
    decode_attention_paged,
    decode_attention_reference,
    decode_attention_sdpa,
    flash_available,
)


def _paged(B, H, H_kv, D, lens, block_size, dtype=torch.float64, seed=0):
    """A shuffled paged pool: each pair's blocks are scattered, unused table entries are -1, pool is NaN-filled."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lens).view(B, H_kv)
    n_blocks = -(-lens // block_size)
    total = int(n_blocks.sum()) + 3
    perm = torch.randperm(total, generator=g)
    table = torch.full((B, H_kv, int(n_blocks.max()) + 1), -1, dtype=torch.long)
    k_pool = torch.full((total, block_size, D), float("nan"), dtype=dtype)
    v_pool = torch.full_like(k_pool, float("nan"))
    i = 0
    for b in range(B):
        for h in range(H_kv):
            for j in range(int(n_blocks[b, h])):
                table[b, h, j] = perm[i]
                i += 1
            for s in range(int(lens[b, h])):
                blk, off = table[b, h, s // block_size], s % block_size
                k_pool[blk, off] = torch.randn(D, generator=g, dtype=dtype)
                v_pool[blk, off] = torch.randn(D, generator=g, dtype=dtype)
    q = torch.randn(B, H, D, generator=g, dtype=dtype)
    return q, k_pool, v_pool, table, lens


def _finite_dead_slots(pool, table, lens):
    """Large finite garbage in the dead slots of referenced blocks (what the paged path may assume)."""
    pool = pool.clone()
    bs = pool.shape[1]
    for b, h in torch.ones_like(lens).nonzero().tolist():
        n = int(lens[b, h])
        for j in range(table.shape[-1]):
            blk = int(table[b, h, j])
            if blk >= 0:
                dead = torch.arange(bs) + j * bs >= n
                pool[blk, dead] = 1e3
    return pool


CASES = [
    (1, 1, 1, 8, [1], 4),
    (2, 2, 1, 8, [0, 6], 4),  # a sequence still in its left padding: no slots
    (2, 4, 2, 16, [5, 1, 17, 3], 4),
    (3, 9, 3, 64, [1, 40, 7, 16, 16, 2, 33, 9, 1], 16),
    (2, 6, 6, 24, [3, 100, 1, 2, 64, 65, 5, 8, 9, 10, 11, 12], 7),
]


@pytest.mark.parametrize("B,H,H_kv,D,lens,bs", CASES)
def test_sdpa_equals_reference(B, H, H_kv, D, lens, bs):
    q, kp, vp, table, lens_t = _paged(B, H, H_kv, D, lens, bs)
    ref = decode_attention_reference(q, kp, vp, table, lens_t)
    out = decode_attention_sdpa(q, kp, vp, table, lens_t)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("B,H,H_kv,D,lens,bs", CASES)
def test_paged_equals_reference(B, H, H_kv, D, lens, bs):
    q, kp, vp, table, lens_t = _paged(B, H, H_kv, D, lens, bs)
    ref = decode_attention_reference(q, kp, vp, table, lens_t)
    # unreferenced blocks stay NaN (must be ignored); dead slots of referenced blocks are finite garbage
    kp, vp = _finite_dead_slots(kp, table, lens_t), _finite_dead_slots(vp, table, lens_t)
    out = decode_attention_paged(q, kp, vp, table, lens_t)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_paged_is_stable_for_large_scores():
    """Scores far above exp's range (the softmax maximum is taken across a pair's blocks)."""
    q, kp, vp, table, lens_t = _paged(2, 4, 2, 16, [40, 3, 17, 9], 4)
    kp, vp = _finite_dead_slots(kp, table, lens_t), _finite_dead_slots(vp, table, lens_t)
    q = q * 500
    ref = decode_attention_reference(q, kp, vp, table, lens_t)
    out = decode_attention_paged(q, kp, vp, table, lens_t)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.cuda
@pytest.mark.skipif(not flash_available(), reason="needs CUDA and flash-attn")
@pytest.mark.parametrize("B,H,H_kv,D,lens", [(2, 8, 2, 64, [5, 300, 1, 257]), (3, 4, 4, 128, [1] * 6 + [600] * 6)])
def test_flash_equals_reference(B, H, H_kv, D, lens):
    q, kp, vp, table, lens_t = _paged(B, H, H_kv, D, lens, 256, dtype=torch.float32)
    ref = decode_attention_reference(q, kp, vp, table, lens_t)
    kp, vp = torch.nan_to_num(kp), torch.nan_to_num(vp)
    dev = lambda t: t.cuda()  # noqa: E731
    out = decode_attention_flash(dev(q).half(), dev(kp).half(), dev(vp).half(), dev(table), dev(lens_t))
    torch.testing.assert_close(out.float().cpu(), ref, rtol=2e-2, atol=2e-2)


def test_paged_in_bfloat16_stays_close_to_the_fp32_reference():
    q, kp, vp, table, lens_t = _paged(3, 9, 3, 64, [1, 40, 7, 16, 16, 2, 33, 9, 1], 16, dtype=torch.float32)
    kp, vp = _finite_dead_slots(kp, table, lens_t), _finite_dead_slots(vp, table, lens_t)
    ref = decode_attention_reference(q, kp, vp, table, lens_t)
    out = decode_attention_paged(q.bfloat16(), kp.bfloat16(), vp.bfloat16(), table, lens_t)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0, atol=3e-2)


@pytest.mark.parametrize("B,H,H_kv,D,lens,bs", CASES)
def test_paged_slot_probabilities_equal_the_reference(B, H, H_kv, D, lens, bs):
    """What eviction policies score slots with: per pool slot, the group-mean attention probability."""
    q, kp, vp, table, lens_t = _paged(B, H, H_kv, D, lens, bs)
    _, want = decode_attention_reference(q, kp, vp, table, lens_t, return_slot_probs=True)
    kp, vp = _finite_dead_slots(kp, table, lens_t), _finite_dead_slots(vp, table, lens_t)
    _, got = decode_attention_paged(q, kp, vp, table, lens_t, return_slot_probs=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for b in range(B):  # each pair's probabilities sum to 1 (or 0 without slots)
        for h in range(H_kv):
            blocks = table[b, h][table[b, h] >= 0]
            assert float(got[blocks].sum()) == pytest.approx(1.0 if lens_t[b, h] else 0.0)


@pytest.mark.parametrize("kv_bits", [16, 4])
def test_triton_on_cpu_tensors_of_a_cuda_machine_is_one_line(monkeypatch, kv_bits):
    """Found on the GPU: a model left on the CPU of a CUDA machine with dmc_decode_backend='triton' reached the
    kernel launch and failed deep inside Triton ('Pointer argument cannot be accessed'); it must be refused
    with the fix named before anything runs."""
    from dmc.ops.decode_backends import resolve

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="on cpu.*move the model to the GPU") as err:
        resolve("dmc", "triton", torch.device("cpu"), 16, kv_bits)
    assert "\n" not in str(err.value)
    assert resolve("dmc", "auto", torch.device("cpu"), 16, kv_bits) == "paged"  # auto picks what runs there


def test_config_backend_names_are_the_registry_s():
    """The config modules are bundled alone (no import of the registry): their lists of backend names are held
    equal to the registry's here."""
    from dmc.config import DECODE_BACKENDS
    from dmc.dms_config import DMS_DECODE_BACKENDS
    from dmc.ops.decode_backends import BACKENDS

    assert set(DECODE_BACKENDS) == {"auto", *BACKENDS["full"]}
    assert set(DMS_DECODE_BACKENDS) == {"auto", *BACKENDS["full"]}


def test_a_backend_without_a_path_over_codes_is_refused_in_one_line_for_either_method():
    from dmc.ops.decode_backends import resolve

    for method in ("dmc", "dms"):
        with pytest.raises(ValueError, match=f"{method}_decode_backend='sdpa' has no path over a 8-bit cache") as err:
            resolve(method, "sdpa", torch.device("cpu"), 16, kv_bits=8)
        assert "\n" not in str(err.value) and f"{method}_kv_bits=16" in str(err.value)
        assert resolve(method, "auto", torch.device("cpu"), 16, kv_bits=4) == "paged"


@pytest.mark.parametrize("B,H,H_kv,D,lens,bs", CASES)
def test_padded_output_and_slot_probabilities_equal_the_reference(B, H, H_kv, D, lens, bs):
    """The policies' batched path over gathered slots: the reference's output, and its per-pool-slot probabilities
    laid out per pair."""
    from dmc.ops.decode_attention import decode_attention_padded, gather_slots

    q, kp, vp, table, lens_t = _paged(B, H, H_kv, D, lens, bs)
    want, want_p = decode_attention_reference(q, kp, vp, table, lens_t, return_slot_probs=True)
    kp, vp = _finite_dead_slots(kp, table, lens_t), _finite_dead_slots(vp, table, lens_t)
    n_blocks = table.shape[-1]
    keys, values = gather_slots(kp, table, n_blocks), gather_slots(vp, table, n_blocks)
    got, got_p = decode_attention_padded(q, torch.nan_to_num(keys), torch.nan_to_num(values), lens_t, D**-0.5)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for b in range(B):
        for h in range(H_kv):
            for s in range(int(lens_t[b, h])):
                assert float(got_p[b, h, s]) == pytest.approx(float(want_p[table[b, h, s // bs], s % bs]), abs=1e-12)
            assert float(got_p[b, h, int(lens_t[b, h]):].abs().sum()) == 0
