"""Perplexity and realised compression ratio of a (DMC or vanilla) causal LM on token blocks."""

from __future__ import annotations

import math

import torch

from dmc.gqa import kv_compression
from dmc.metrics import freed_slots
from dmc.schedule import cr_from_merges


@torch.no_grad()
def score_sums(model, blocks: torch.Tensor, batch_size: int = 4, batches: int | None = None,
               filler: torch.Tensor | None = None) -> dict:
    """Sums over ``blocks`` (N, T) for perplexity and realised CR: ``nll`` and ``count`` (predicted tokens),
    and for DMC and DMS models ``merges`` (L, H_kv: the slots freed) and ``tokens``. The model runs its eval-mode
    parallel form, which equals compressed decoding.

    ``batches``: run exactly this many forwards, the ones past the last block on ``filler`` (1, T) with weight
    0, so that every rank of a sharded model (DeepSpeed ZeRO-3) calls forward as often as the others.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = -(-len(blocks) // batch_size) if batches is None else batches
    nll, count, merges, tokens = 0.0, 0, None, 0
    for i in range(total):
        ids = blocks[i * batch_size : (i + 1) * batch_size]
        weight = 1 if len(ids) else 0
        ids = (ids if len(ids) else filler).to(device)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        n = ids.shape[0] * (ids.shape[1] - 1) * weight
        nll += out.loss.float().item() * n
        count += n
        freed = freed_slots(out)
        if freed is not None:
            m = freed[0].sum(1).double().cpu() * weight  # (L, H_kv)
            merges = m if merges is None else merges + m
            tokens += int(freed[1].sum()) * weight
    model.train(was_training)
    return {"nll": nll, "count": count, "merges": merges, "tokens": tokens}


def summarise(sums: dict, config) -> dict:
    """Perplexity, realised CR (tokens per slot over all layers and KV heads) and CR per layer of ``sums``."""
    # a model without DMC outputs stores every token; a GQA-pooled one in fewer heads than its source
    result = {"perplexity": math.exp(sums["nll"] / max(sums["count"], 1)), "tokens": sums["count"],
              "cr": kv_compression(config), "cr_per_layer": []}
    if sums["merges"] is not None:
        cr = cr_from_merges(sums["merges"], sums["tokens"])
        result["cr"], result["cr_per_layer"] = cr["cr"], cr["per_layer"].tolist()
    return result


def perplexity_and_cr(model, blocks: torch.Tensor, batch_size: int = 4) -> dict:
    """blocks (N, T): perplexity, realised CR and CR per layer (:func:`score_sums` then :func:`summarise`)."""
    return summarise(score_sums(model, blocks, batch_size), model.config)
