"""Bad input gets a clear error naming the problem and the fix."""

import pytest
import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import dmc
from tests.helpers import mixed_dmc, random_ids, tiny_llama


def test_non_llama_model_is_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(dmc.NotLlamaError, match="Llama-architecture.*GPT2LMHeadModel"):
        dmc.retrofit(gpt2, dmc.DMCConfig())
    with pytest.raises(dmc.NotLlamaError, match="got Linear"):
        dmc.retrofit(torch.nn.Linear(2, 2))


def test_head_dim_that_cannot_host_the_channel():
    cfg = LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)  # head_dim 2
    with pytest.raises(dmc.DMCConfigError, match="head_dim=2 cannot host"):
        dmc.retrofit(LlamaForCausalLM(cfg), dmc.DMCConfig())


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("target_cr", 0.5, "must be >= 1"),
        ("window", -3, "positive number of tokens"),
        ("tau", 0.0, "must be > 0"),
        ("weight_eps", 0.0, "must be > 0"),
        ("train_attention", "fast", "choose one of auto, flex, sdpa, triton, reference"),
        ("decode_backend", "cuda", "choose one of auto, paged, cpu, sdpa, reference, flash"),
        ("block_size", 0, "positive number of slots"),
        ("enabled", "yes", "true or false"),
    ],
)
def test_invalid_dmc_values(field, value, message):
    with pytest.raises(dmc.DMCConfigError, match=f"dmc_{field}=.*{message}"):
        dmc.DMCConfig(**{field: value})


def test_channel_out_of_range():
    with pytest.raises(dmc.DMCConfigError, match="dmc_channel=99"):
        dmc.retrofit(tiny_llama(), dmc.DMCConfig(channel=99))


def test_unknown_dmc_field_lists_valid_ones():
    with pytest.raises(dmc.DMCConfigError, match="unknown DMC config field.*dmc_ratio.*valid fields: dmc_enabled"):
        dmc.DMCLlamaConfig(dmc_ratio=2)


def test_wrong_cache_type():
    model = mixed_dmc("gqa", 12)
    with pytest.raises(dmc.DMCCacheError, match="needs a DMCCache, got DynamicCache"):
        model(random_ids(1, 4), past_key_values=DynamicCache(config=model.config))


def test_cache_in_training_mode():
    model = mixed_dmc("gqa", 12).train()
    with pytest.raises(dmc.DMCCacheError, match="call model.eval"):
        model(random_ids(1, 4), past_key_values=dmc.DMCCache(model.config))


def test_right_padding_with_cache():
    model = mixed_dmc("gqa", 12)
    mask = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(dmc.DMCCacheError, match="left padding only"):
        model(random_ids(1, 4), attention_mask=mask, past_key_values=dmc.DMCCache(model.config))


def test_cache_misuse():
    model = mixed_dmc("gqa", 12)
    cache = dmc.DMCCache(model.config)
    with pytest.raises(dmc.DMCCacheError, match="empty: run a forward pass first"):
        cache.num_slots(0)
    with pytest.raises(dmc.DMCCacheError, match="cannot take plain key/value updates"):
        cache.update(torch.zeros(1, 2, 1, 16), torch.zeros(1, 2, 1, 16), 0)
    with torch.no_grad():
        model(random_ids(1, 4), past_key_values=cache)
    with pytest.raises(dmc.DMCCacheError, match="cannot be cropped"):
        cache.crop(1)


def test_four_d_mask_is_refused():
    model = mixed_dmc("gqa", 12)
    with pytest.raises(ValueError, match="2D attention_mask"):
        model(random_ids(1, 4), attention_mask=torch.ones(1, 1, 4, 4), use_cache=False)
