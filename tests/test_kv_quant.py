"""The slot codec (dmc/ops/kv_quant.py): round-trip error within the format's bound, packing, bad widths."""

import pytest
import torch

from dmc.ops.kv_quant import (
    check_bits,
    code_width,
    dequantize,
    error_bound,
    quantize,
    resolve_group,
    round_trip_across_slots,
)


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
    from dmc.dms_config import DMS_KV_BITS
    from dmc.ops.kv_quant import KV_BITS

    assert CONFIG_BITS == KV_BITS == DMS_KV_BITS


@pytest.mark.parametrize("bits", [8, 4], ids=lambda b: f"int{b}")
def test_across_slots_codes_each_channel_over_consecutive_closed_slots(bits):
    """KIVI's key grouping (bench/kv_grouping.py): groups run along the closed slots in order, skipping hidden
    states, which come back untouched; each element is within half its own group's step."""
    G, T, D = 4, 19, 8
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(2, 2, T, D, generator=gen) * torch.logspace(-2, 1, D)
    keep = torch.rand(2, 2, T, generator=gen) < 0.6
    keep[1, 1] = False  # a pair with no closed slot
    keep[0, 0] = True
    # channel 0 constant within each group of kept slots and different between groups: exact only if the groups
    # follow the kept slots' order, not their positions
    rank = keep.long().cumsum(-1) - 1
    x[..., 0] = (rank // G).float() * 1.5 + 0.25
    back = round_trip_across_slots(x, keep, bits, G)
    assert torch.equal(back[~keep], x[~keep])
    assert torch.equal(back[..., 0][keep], x[..., 0][keep])
    for b, h in keep.any(-1).nonzero().tolist():
        rows, got = x[b, h][keep[b, h]], back[b, h][keep[b, h]]
        for start in range(0, rows.shape[0], G):
            grp = rows[start : start + G]
            step = (grp.amax(0) - grp.amin(0)) / (2**bits - 1)  # per channel
            err = (got[start : start + G] - grp).abs()
            assert bool((err <= step / 2 * 1.01 + 1e-3 * grp.abs().amax(0)).all())
    assert not torch.equal(back[keep], x[keep])  # it does code


def test_the_default_group_is_the_widths_measured_one_and_the_cache_takes_it():
    """No group set: 32 channels at int8, 16 at int4 (cut to a divisor of the head dim); bytes by hand."""
    from dmc import DMCLlamaConfig
    from dmc.cache import DMCCache
    from dmc.paged_slots import slot_bytes

    assert [resolve_group(b, None, 64) for b in (8, 4)] == [32, 16]
    assert resolve_group(8, None, 48) == 16 and resolve_group(4, None, 8) == 8
    assert resolve_group(4, 128, 64) == 64  # a group wider than the head is the head
    with pytest.raises(ValueError, match="not a multiple"):
        resolve_group(4, 24, 64)
    # one slot's key and value at head dim 64: codes, then an fp16 scale and minimum per group
    assert slot_bytes(64, torch.float16, 8) == 2 * (64 + 2 * 2 * 2)
    assert slot_bytes(64, torch.float16, 4) == 2 * (32 + 2 * 2 * 4)
    assert slot_bytes(64, torch.float16, 4, 32) == 2 * (32 + 2 * 2 * 2)
    config = DMCLlamaConfig(vocab_size=32, hidden_size=128, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, dmc_kv_bits=4)
    assert config.dmc_kv_group is None
    layer = DMCCache(config).layer(0)
    layer.init_pool(1, torch.float32, "cpu")
    assert layer.kv_group == 16 and layer.k_scale.shape[-1] == 64 // 16
