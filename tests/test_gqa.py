"""The GQA baseline's conversion: mean-pooled KV heads (Ainslie et al., 2023)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from dmc.gqa import GQAError, kv_compression, kv_heads_for, pool_kv_heads, save_gqa_folder

from .helpers import random_ids, tiny_llama


@torch.no_grad()
def _duplicate_kv_heads(model, groups_of: int) -> None:
    """Make every run of ``groups_of`` contiguous KV heads identical (pooling them then changes nothing)."""
    cfg = model.config
    hd = cfg.hidden_size // cfg.num_attention_heads
    for layer in model.model.layers:
        for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
            w = proj.weight.view(cfg.num_key_value_heads // groups_of, groups_of, hd, -1)
            w.copy_(w[:, :1].expand_as(w))


@pytest.mark.parametrize("kind,kv_heads", [("mha", 2), ("mha", 1), ("gqa", 1)])
def test_pooling_duplicated_heads_keeps_the_logits(kind, kv_heads):
    model = tiny_llama(kind, torch.float64)
    _duplicate_kv_heads(model, model.config.num_key_value_heads // kv_heads)
    ids = random_ids(2, 17)
    before = model(ids).logits
    pool_kv_heads(model, kv_heads)
    assert model.config.num_key_value_heads == kv_heads
    assert model.model.layers[0].self_attn.k_proj.weight.shape[0] == kv_heads * (96 // model.config.num_attention_heads)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-12)
    # and decoding with the (smaller) cache agrees with the full forward
    out = model(ids[:, :-1], use_cache=True)
    step = model(ids[:, -1:], past_key_values=out.past_key_values).logits
    torch.testing.assert_close(step[:, -1], before[:, -1], rtol=0, atol=1e-10)
    assert out.past_key_values.layers[0].keys.shape[1] == kv_heads


def test_pooling_is_the_mean_of_contiguous_heads():
    model = tiny_llama("mha", torch.float64)  # 4 KV heads of dim 24
    k = model.model.layers[1].self_attn.k_proj.weight.clone().view(4, 24, 96)
    v = model.model.layers[1].self_attn.v_proj.weight.clone().view(4, 24, 96)
    q = model.model.layers[1].self_attn.q_proj.weight.clone()
    pool_kv_heads(model, 2)
    attn = model.model.layers[1].self_attn
    torch.testing.assert_close(attn.k_proj.weight.view(2, 24, 96), torch.stack([k[:2].mean(0), k[2:].mean(0)]))
    torch.testing.assert_close(attn.v_proj.weight.view(2, 24, 96), torch.stack([v[:2].mean(0), v[2:].mean(0)]))
    assert torch.equal(attn.q_proj.weight, q)
    assert attn.num_key_value_groups == 2
    assert kv_compression(model.config) == 2.0


def test_one_group_per_head_is_the_identity():
    model = tiny_llama("gqa", torch.float64)
    ids = random_ids(1, 9)
    before = model(ids).logits
    pool_kv_heads(model, 2)
    assert torch.equal(model(ids).logits, before)
    assert kv_compression(model.config) == 1.0


def test_counts_and_crs_that_do_not_fit_are_refused():
    config = tiny_llama("gqa").config  # 2 KV heads
    assert kv_heads_for(config, cr=2) == 1
    with pytest.raises(GQAError, match="reaches only 1x, 2x"):
        kv_heads_for(config, cr=4)
    with pytest.raises(GQAError, match="must divide"):
        kv_heads_for(tiny_llama("mha").config, kv_heads=3)
    with pytest.raises(GQAError, match="GQA pooling converts vanilla Llama"):
        import dmc

        pool_kv_heads(dmc.retrofit(tiny_llama("gqa")), 1)


def test_pooling_twice_counts_from_the_source():
    model = tiny_llama("mha", torch.float64)
    pool_kv_heads(model, 2)
    assert kv_heads_for(model.config, cr=4) == 1  # 4x of the 4-head source, not of the 2-head model
    with pytest.raises(GQAError, match="the model's 2 KV heads into 4"):
        kv_heads_for(model.config, kv_heads=4)  # divides the source's 4, but pooling cannot add heads back
    pool_kv_heads(model, 1)
    assert kv_compression(model.config) == 4.0


def test_folder_is_a_plain_llama_that_records_its_source(tmp_path):
    model = tiny_llama("mha", torch.float64)
    pool_kv_heads(model, 1)
    ids = random_ids(1, 11)
    logits = model(ids).logits
    out = save_gqa_folder(model, tmp_path / "gqa", None, dtype="float64", card={"base_model": "tiny"})
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 1
    assert config["gqa_source_kv_heads"] == 4
    assert "4 -> 1" in (out / "README.md").read_text()
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    assert kv_compression(loaded.config) == 4.0
    torch.testing.assert_close(loaded(ids).logits, logits, rtol=0, atol=1e-12)
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind
