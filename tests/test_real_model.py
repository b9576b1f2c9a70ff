"""The invariants on real weights: SmolLM2-135M (30 layers, GQA 9/3, tied embeddings), converted by `make model`."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import dmc
from tests.helpers import drive_mixed_decisions

MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "smollm2-135m"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (MODEL / "config.json").exists(), reason="run `make model` to fetch SmolLM2-135M"),
]


@pytest.fixture(scope="module")
def ids():
    tok = AutoTokenizer.from_pretrained(MODEL)
    text = Path(__import__("textwrap").__file__).read_text()[:4000]
    return tok(text, return_tensors="pt").input_ids[:, :80]


def _load():
    return AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()


@torch.no_grad()
def test_real_model_kill_switch_and_decode_equivalence(ids):
    vanilla = _load()
    assert vanilla.config.num_key_value_heads == 3 and vanilla.config.tie_word_embeddings
    expected = vanilla(ids).logits
    model = dmc.retrofit(_load(), dmc.DMCConfig(enabled=False))
    assert torch.equal(model(ids).logits, expected)

    model.config.dmc_enabled = True
    drive_mixed_decisions(model, scale=0.5)
    full = model(ids, use_cache=False)
    frac = full.dmc_merges.sum().item() / (full.dmc_merges.numel() * ids.shape[1])
    assert 0.05 < frac < 0.95, f"decisions should be mixed, merge fraction {frac:.2f}"
    cache = dmc.DMCCache(model.config)
    logits = [model(ids[:, :48], past_key_values=cache).logits]
    logits += [model(ids[:, t : t + 1], past_key_values=cache).logits for t in range(48, ids.shape[1])]
    torch.testing.assert_close(torch.cat(logits, 1), full.logits, rtol=1e-4, atol=1e-3)
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(cache.num_slots(layer), full.dmc_tokens[:, None] - full.dmc_merges[layer])
