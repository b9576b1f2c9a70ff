"""Perplexity and realised compression ratio of a (DMC or vanilla) causal LM on token blocks."""

from __future__ import annotations

import math

import torch

from .gqa import kv_compression
from .schedule import cr_from_merges


@torch.no_grad()
def perplexity_and_cr(model, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """blocks (N, T). The DMC model runs its eval-mode parallel form, which equals compressed decoding.

    Returns perplexity, realised CR (tokens per slot over all layers and KV heads), and the CR per layer.
    """
    was_training = model.training
    model.eval()
    nll, count, merges, slots_total = 0.0, 0, None, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size]
        out = model(input_ids=ids, labels=ids, use_cache=False)
        n = ids.shape[0] * (ids.shape[1] - 1)
        nll += out.loss.item() * n
        count += n
        m = getattr(out, "dmc_merges", None)
        if m is not None:
            merges = m.sum(1).double() if merges is None else merges + m.sum(1).double()  # (L, H_kv)
            slots_total += int(out.dmc_tokens.sum())
    model.train(was_training)
    # a model without DMC outputs stores every token; a GQA-pooled one in fewer heads than its source
    result = {"perplexity": math.exp(nll / max(count, 1)), "tokens": count, "cr": kv_compression(model.config),
              "cr_per_layer": []}
    if merges is not None:
        cr = cr_from_merges(merges, slots_total)
        result["cr"], result["cr_per_layer"] = cr["cr"], cr["per_layer"].tolist()
    return result
