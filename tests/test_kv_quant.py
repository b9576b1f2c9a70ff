"""The slot codec (dmc/ops/kv_quant.py): round-trip error within the format's bound, packing, bad widths."""

import pytest
import torch

from dmc.ops.kv_quant import check_bits, code_width, dequantize, error_bound, quantize


@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"int{b}")
@pytest.mark.parametrize("group", [16, 64], ids=lambda g: f"group{g}")
def test_round_trip_within_half_a_step(bits, group):
    g = torch.Generator().manual_seed(bits * group)
    # awkward magnitudes: outlier channels, a constant group, tiny and large values
    x = torch.randn(5, 3, 64, generator=g) * torch.logspace(-3, 2, 64)
    x[0, 0, :group] = 0.25
    codes, scale, lo = quantize(x, bits, group)
    assert codes.dtype == torch.uint8 and codes.shape == (5, 3, code_width(64, bits))
    assert scale.shape == lo.shape == (5, 3, 64 // group)
    back = dequantize(codes, scale, lo, bits)
    err = (back - x).abs()
    bound = error_bound(scale, lo, group)
    assert bool((err <= bound).all()), float((err - bound).max())
    assert torch.equal(back[0, 0, :group], x[0, 0, :group])  # a constant group is exact
    # the bound is tight enough to mean something: about half a step, not a multiple of the range
    step = (x.reshape(5, 3, -1, group).amax(-1) - x.reshape(5, 3, -1, group).amin(-1)) / (2**bits - 1)
    assert float(err.max()) <= float(step.max()) * 0.51


def test_more_bits_less_error():
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    errs = [(dequantize(*quantize(x, b, 32), b) - x).abs().mean() for b in (4, 8)]
    assert errs[1] < errs[0] / 10


def test_int4_packs_two_codes_per_byte_low_nibble_first():
    x = torch.tensor([[0.0, 15.0, 3.0, 12.0]])  # range 15, scale 1: codes are the values themselves
    codes, scale, lo = quantize(x, 4, 4)
    assert codes.tolist() == [[0 | 15 << 4, 3 | 12 << 4]]
    assert dequantize(codes, scale, lo, 4).tolist() == x.tolist()


def test_nan_slots_do_not_spread():
    # a pool is zero-filled, but an unwritten slot of a fresh allocation may hold anything: its codes stay finite
    x = torch.full((2, 64), float("nan"))
    codes, scale, lo = quantize(x, 8, 32)
    assert torch.isfinite(dequantize(codes, scale, lo, 8)).all()


def test_bits_are_checked():
    assert check_bits(4) == 4
    with pytest.raises(ValueError, match="one of 16, 8, 4"):
        check_bits(3)


def test_the_config_accepts_exactly_the_widths_the_codec_codes():
    from dmc.config import KV_BITS as CONFIG_BITS
    from dmc.ops.kv_quant import KV_BITS

    assert CONFIG_BITS == KV_BITS
