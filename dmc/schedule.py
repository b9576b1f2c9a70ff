"""The compression-ratio schedule and the one-sided CR loss (small pure functions)."""

from __future__ import annotations

import torch


def cr_schedule(step: int, target_cr: float, ramp_steps: int, start_step: int = 0) -> float:
    """Target CR at ``step``: ``1 + (target - 1) * min(1, (step - start) / ramp_steps)``, 1 before ``start``."""
    if target_cr < 1:
        raise ValueError(f"target_cr={target_cr} must be >= 1")
    if step <= start_step:
        return 1.0
    if ramp_steps <= 0:
        return float(target_cr)
    return 1.0 + (target_cr - 1.0) * min(1.0, (step - start_step) / ramp_steps)


def stage1_multiplier(step: int, stage1_steps: int) -> float:
    """Neuron zero-out multiplier ``max(0, 1 - step / (0.8 * stage1_steps))`` for the decision channel."""
    if stage1_steps <= 0:
        return 0.0
    return max(0.0, 1.0 - step / (0.8 * stage1_steps))


def cr_loss(alpha_mean: torch.Tensor, current_cr: float) -> torch.Tensor:
    """One-sided loss ``mean_b max(0, (1 - 1/CR_t) - alpha_mean_b)``; only under-compression is penalised.

    alpha_mean (B,): mean hard (straight-through) decision of each sequence over layers, heads, positions.
    """
    if current_cr < 1:
        raise ValueError(f"current_cr={current_cr} must be >= 1")
    return torch.relu((1.0 - 1.0 / current_cr) - alpha_mean).mean()


def cr_from_merges(merges: torch.Tensor, tokens: float | torch.Tensor) -> dict:
    """Realised CR from merge counts: ``merges`` (L, H_kv) summed over sequences, ``tokens`` the real tokens
    each head saw (summed over the same sequences). A head keeps ``tokens - merges`` slots.

    Returns {"cr": overall float, "per_layer": (L,) tensor, "per_head": (L, H_kv) tensor}.
    """
    merges = merges.double()
    tokens = float(tokens)
    slots = (tokens - merges).clamp(min=1e-9)
    layer_tokens = tokens * merges.shape[1]
    return {
        "cr": float(tokens * merges.numel() / slots.sum()),
        "per_layer": layer_tokens / slots.sum(1),
        "per_head": tokens / slots,
    }


def realised_cr(alpha_mean: torch.Tensor | float) -> float:
    """Compression ratio ``1 / (1 - mean alpha)`` (tokens per cache slot)."""
    a = float(alpha_mean.mean()) if isinstance(alpha_mean, torch.Tensor) else float(alpha_mean)
    return float("inf") if a >= 1.0 else 1.0 / (1.0 - a)
