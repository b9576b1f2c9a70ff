"""Facts derived from a model's config or cache, each computed in one place.

Part of the bundled modeling code (dmc/export.py bundles what modeling.py imports), so it needs torch alone.
"""

from __future__ import annotations

import torch

LLAMA_TYPES = ("llama", "dmc_llama", "dms_llama")  # the model types dmc runs: vanilla Llama, its DMC and DMS retrofits


def head_dim(config) -> int:
    """Channels per attention head of a Llama-style config (``head_dim`` when the config sets it)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def freed_slots(out) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(freed (L, B, H_kv), tokens (B,)) of a compressed model's forward: slots a (layer, sequence, KV head) does
    not hold of its real tokens (DMC's merges, DMS's evictions by the last token), so that it holds
    ``tokens - freed``; None for a model that holds every token."""
    for freed, tokens in (("dmc_merges", "dmc_tokens"), ("dms_evicted", "dms_tokens")):
        if getattr(out, freed, None) is not None:
            return getattr(out, freed), getattr(out, tokens)
    return None


def cache_realised_cr(cache, tokens: torch.Tensor) -> list[float]:
    """Per sequence, the tokens it fed ``cache`` over its mean live slots (all layers and KV heads)."""
    slots = torch.stack([cache.num_slots(i).float() for i in range(len(cache.layers))])  # (L, B, H_kv)
    return (tokens.float().to(slots.device) / slots.mean(dim=(0, 2)).clamp(min=1)).tolist()
