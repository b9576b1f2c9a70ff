"""Quantised DMS slots (dms_kv_bits 8/4): logits near the full-precision cache's, the bytes, and a bad group. (That
one-pass prefill, chunked prefill and decoding agree on the codes: tests/test_dms.py, parametrised over widths.)"""

from __future__ import annotations

import pytest
import torch

from dmc.paged_slots import slot_bytes
from tests.helpers import random_ids
from tests.test_dms import mixed_dms, run_chunks


def coded(model, bits: int, group: int | None = None):
    model.config.dms_kv_bits, model.config.dms_kv_group = bits, group  # every new DMSCache reads them
    return model


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_slots_are_close_to_the_full_precision_cache_and_smaller(bits):
    """The same decisions in the first layer (its gate reads the embeddings), logits near the 16-bit cache's (int8
    closer than int4), and the blocks in use as many times smaller as a coded slot is."""
    full_model = mixed_dms("gqa", window=3)
    ids = random_ids(2, 20)
    full, full_cache = run_chunks(full_model, ids, [12] + [1] * 8)
    model = coded(mixed_dms("gqa", window=3), bits)
    got, cache = run_chunks(model, ids, [12] + [1] * 8)
    assert torch.equal(cache.layer(0).lens, full_cache.layer(0).lens)
    error = float((got - full).abs().max() / full.abs().max())
    assert 0 < error < {8: 0.02, 4: 0.2}[bits]
    D = cache.layer(0).head_dim
    for i in range(model.config.num_hidden_layers):
        layer, ref = cache.layer(i), full_cache.layer(i)
        shrink = slot_bytes(D, torch.float64, bits, layer.kv_group) / slot_bytes(D, torch.float64)
        blocks = layer.allocated_bytes() / layer.block_bytes()
        assert blocks == ref.allocated_bytes() / ref.block_bytes() or not torch.equal(layer.lens, ref.lens)
        assert layer.block_bytes() == pytest.approx(ref.block_bytes() * shrink)


def test_a_bad_group_is_one_line():
    import dmc

    with pytest.raises(dmc.DMSConfigError, match="dms_kv_group") as err:
        dmc.DMSConfig(kv_bits=8, kv_group=-2)
    assert "\n" not in str(err.value)
