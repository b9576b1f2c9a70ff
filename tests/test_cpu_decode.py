"""The C++ decode attention for the CPU (``dmc/ops/cpu_decode.py``) against the reference on awkward shapes, the
model's decoding on it against the reference backend, ``auto``'s choice, and its refusals."""

import pytest
import torch

from dmc.cache import DMCCache
from dmc.ops.cpu_decode import cpu_decode_available, decode_attention_cpu, decode_attention_quant_cpu
from dmc.ops.decode_attention import decode_attention_reference
from dmc.ops.decode_backends import resolve
from tests.helpers import CODED_SHAPES, coded_attention_cases, mixed_dmc, random_ids, random_paged_pool

needs_kernel = pytest.mark.skipif(not cpu_decode_available(), reason="no C++ compiler to build the CPU kernel")


@needs_kernel
@pytest.mark.parametrize("B,H,H_kv,D,bs,lens", [
    (2, 9, 3, 64, 16, [1, 17, 40, 16, 0, 33]),  # SmolLM2 heads, ragged, an empty pair, block edges
    (1, 4, 4, 40, 5, [7, 1, 12, 5]),  # MHA, head dim not a power of two, odd block size
    (3, 6, 2, 24, 3, [2, 9, 0, 1, 10, 4]),
    (1, 2, 1, 8, 1, [6]),  # one slot per block
])
def test_cpu_kernel_equals_the_reference(B, H, H_kv, D, bs, lens):
    k_pool, v_pool, table, lens_t = random_paged_pool(B, H_kv, D, bs, lens)
    k_pool[k_pool.abs() > 2] = 1e4  # large scores: the running maximum matters
    q = torch.randn(B, H, D, generator=torch.Generator().manual_seed(1))
    want = decode_attention_reference(q, k_pool, v_pool, table, lens_t, scale=0.3)
    got = decode_attention_cpu(q, k_pool, v_pool, table, lens_t, scale=0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("window", [12, 0])
def test_decoding_on_the_cpu_kernel_equals_the_reference_backend(window):
    """Forced mixed decisions, a ragged left-padded batch: same logits and slot counts."""
    model = mixed_dmc("gqa", window=window, dtype=torch.float32, block_size=4).eval()
    _check_backend_equals_reference(model, random_ids(2, 11, seed=3), pad=4, tol=1e-5)


def _check_backend_equals_reference(model, ids, pad: int, tol: float) -> None:
    """Prefill 5 tokens, then decode one at a time, row 1 left-padded by ``pad``: the ``cpu`` backend's logits
    and slot counts against the ``reference`` backend's."""
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0

    def run(backend):
        model.config.dmc_decode_backend = backend
        cache = DMCCache(model.config)
        with torch.no_grad():
            logits = [model(ids[:, :5], attention_mask=mask[:, :5], past_key_values=cache).logits]
            logits += [model(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache).logits
                       for t in range(5, ids.shape[1])]
        return torch.cat(logits, 1), torch.stack([cache.num_slots(i) for i in range(model.config.num_hidden_layers)])

    (want, want_slots), (got, got_slots) = run("reference"), run("cpu")
    assert torch.equal(got_slots, want_slots)
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], atol=tol, rtol=tol)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("B,H,H_kv,D,bs,group,lens", CODED_SHAPES)
def test_cpu_kernel_over_codes_equals_decoding_everything(bits, B, H, H_kv, D, bs, group, lens):
    for q, k, v, table, lens_t, extra, want in coded_attention_cases(bits, B, H, H_kv, D, bs, group, lens):
        got = decode_attention_quant_cpu(q, k, v, table, lens_t, *extra, scale=0.3)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)


@needs_kernel
@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"int{b}")
def test_decoding_on_codes_with_the_cpu_kernel_equals_the_reference_backend(bits):
    """A ragged left-padded batch on int8/int4 slots: same logits and slot counts."""
    model = mixed_dmc("gqa", window=12, dtype=torch.float32, block_size=4, kv_bits=bits, kv_group=8).eval()
    _check_backend_equals_reference(model, random_ids(2, 12, seed=3), pad=3, tol=1e-4)


def test_auto_picks_the_kernel_for_float32_on_the_cpu_and_the_paged_path_otherwise(monkeypatch):
    cpu = torch.device("cpu")
    want = "cpu" if cpu_decode_available() else "paged"
    assert resolve("dmc", "auto", cpu, 16, 16, torch.float32) == want
    assert resolve("dmc", "auto", cpu, 16, 16, torch.float64) == "paged"
    assert resolve("dmc", "auto", cpu, 16, 8, torch.float32) == want  # over codes too
    assert resolve("dmc", "auto", cpu, 16, 4, torch.float64) == "paged"
    monkeypatch.setenv("DMC_CPU_KERNEL", "0")
    assert resolve("dmc", "auto", cpu, 16, 16, torch.float32) == "paged"


def test_the_kernel_asked_for_another_dtype_names_the_fallback():
    with pytest.raises(RuntimeError, match=r"dmc_decode_backend='cpu' is a C\+\+ loop over float32.*use "
                                           r"dmc_decode_backend='paged'"):
        resolve("dmc", "cpu", torch.device("cpu"), 16, 16, torch.bfloat16)
