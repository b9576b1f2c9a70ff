"""Impose a chosen compression ratio on an untrained DMC or DMS model, for speed and memory benchmarks only.

The merge logit of a head is ``k[c] - offset``. We give every k decision row a random direction, scale it
so that ``k[c]`` has unit spread on real text in every (layer, KV head), and then pick the one offset that
makes the model's realised CR on that text hit the target (bisection: merges early in the network change
what later layers see). The model's outputs are meaningless; its cache behaves like a trained one at that CR.
A DMS model gets the same treatment on its gates: random unit-spread projections, one offset found by bisection.
"""

from __future__ import annotations

import math

import torch

from dmc.metrics import freed_slots
from dmc.schedule import cr_from_merges


@torch.no_grad()
def _decision_spread(model, ids: torch.Tensor) -> list[torch.Tensor]:
    D, c = model.config.dmc_head_dim, model.config.dmc_channel_index
    spreads, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        def grab(module, args, out, i=i):
            spreads[i] = out[..., c::D].flatten(0, -2).float().std(0)  # (H_kv,)
        hooks.append(layer.self_attn.k_proj.register_forward_hook(grab))
    try:
        model(ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return [spreads[i] for i in range(len(model.model.layers))]


@torch.no_grad()
def realised_cr_on(model, ids: torch.Tensor) -> float:
    out = model(ids, use_cache=False, logits_to_keep=1)
    freed, tokens = freed_slots(out)
    return cr_from_merges(freed.sum(1), tokens.sum())["cr"]


def _bisect_offset(set_offset, model, ids, target_cr: float, start: float, iterations: int) -> float:
    """The offset (a lower one frees more slots) at which ``model`` realises about ``target_cr`` on ``ids``."""
    lo, hi, offset, cr = -4.0, 4.0, start, 1.0
    for _ in range(iterations):
        set_offset(offset)
        cr = realised_cr_on(model, ids)
        if abs(cr / target_cr - 1) < 0.01:
            break
        lo, hi = (lo, offset) if cr < target_cr else (offset, hi)
        offset = (lo + hi) / 2
    return cr


@torch.no_grad()
def impose_synthetic_dms(model, target_cr: float, ids: torch.Tensor, seed: int = 0, iterations: int = 12) -> float:
    """Random gates with unit-spread logits per (layer, KV head) on ``ids``, and the offset that makes the model's
    realised CR on ``ids`` (the window counted) about ``target_cr``. Returns that CR."""
    if target_cr < 1:
        raise ValueError(f"target_cr={target_cr} must be >= 1")
    model.eval()
    g = torch.Generator().manual_seed(seed)
    gates = [layer.dms_gate for layer in model.model.layers]
    spreads = {}
    for gate in gates:
        gate.offset, gate.scale = 1e4, 1.0  # nothing evicted while measuring the spread
        gate.proj.weight.copy_(torch.randn(gate.proj.weight.shape, generator=g).to(gate.proj.weight.dtype))
    hooks = [gate.proj.register_forward_hook(lambda m, a, out, i=i: spreads.__setitem__(i, out.flatten(0, -2).float().std(0)))
             for i, gate in enumerate(gates)]
    try:
        model(ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    for i, gate in enumerate(gates):
        gate.proj.weight /= spreads[i].clamp(min=1e-6)[:, None].to(gate.proj.weight.dtype)
    if target_cr == 1:
        return realised_cr_on(model, ids)

    def set_offset(offset: float) -> None:
        for gate in gates:
            gate.offset = offset

    return _bisect_offset(set_offset, model, ids, target_cr, 0.0, iterations)


@torch.no_grad()
def impose_synthetic_cr(model, target_cr: float, ids: torch.Tensor, seed: int = 0, iterations: int = 12) -> float:
    """Set the decision rows and offset of ``model`` so that it compresses ``ids`` at about ``target_cr``.

    Returns the realised CR on ``ids``. ``target_cr == 1`` turns merging off (offset +inf).
    """
    if target_cr < 1:
        raise ValueError(f"target_cr={target_cr} must be >= 1")
    model.eval()
    D, c = model.config.dmc_head_dim, model.config.dmc_channel_index
    g = torch.Generator().manual_seed(seed)
    model.config.dmc_logit_offset = 1e4  # no merges while measuring the spread
    for layer in model.model.layers:
        w = layer.self_attn.k_proj.weight
        w[c::D] = torch.randn(w[c::D].shape, generator=g).to(w.dtype)
    if target_cr == 1:
        return realised_cr_on(model, ids)
    for layer, spread in zip(model.model.layers, _decision_spread(model, ids)):
        w = layer.self_attn.k_proj.weight
        w[c::D] /= spread.clamp(min=1e-6)[:, None].to(w.dtype)
    # Unit-spread logits merge with probability P(z > offset): start at the Gaussian quantile.
    merge_rate = 1 - 1 / target_cr
    start = math.sqrt(2) * torch.special.erfinv(torch.tensor(1 - 2 * merge_rate)).item()
    return _bisect_offset(lambda offset: setattr(model.config, "dmc_logit_offset", offset), model, ids, target_cr,
                          start, iterations)
