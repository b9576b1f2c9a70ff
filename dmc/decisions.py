"""Decisions (alpha) and merge weights (omega) read from the repurposed channel of k and q.

Shapes: q (B, H, T, D), k (B, H_kv, T, D), decisions per (B, H_kv, T).
"""

from __future__ import annotations

import torch


def read_decision_channel(
    q: torch.Tensor, k: torch.Tensor, channel: int, logit_offset: float, weight_offset: float, weight_eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the decision channel off pre-RoPE q and k.

    Returns ``(logit, omega, q0, k0)``:
      logit (B, H_kv, T) = k[..., c] - logit_offset          (merge logit l_t)
      omega (B, H_kv, T) = sigmoid(mean_group q[..., c] + weight_offset) + weight_eps
      q0, k0: q and k with channel c set to 0, so it never adds a q.k term.
    Computed in at least fp32 (decisions are discontinuous; low precision would flip them).
    """
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    work = torch.promote_types(q.dtype, torch.float32)
    logit = k[..., channel].to(work) - logit_offset  # (B, H_kv, T)
    q_group = q[..., channel].to(work).view(B, H_kv, H // H_kv, T).mean(dim=2)  # (B, H_kv, T)
    omega = torch.sigmoid(q_group + weight_offset) + weight_eps
    keep = torch.ones(D, dtype=q.dtype, device=q.device)
    keep[channel] = 0
    return logit, omega, q * keep, k * keep.to(k.dtype)


def gumbel_sigmoid_logits(logit: torch.Tensor, tau: float, generator: torch.Generator | None = None,
                          noise: bool = True) -> torch.Tensor:
    """Relaxed merge logit ``(l + g1 - g2) / tau`` with g1, g2 ~ Gumbel(0, 1), noise in fp32
    (``noise=False``: ``l / tau``, the deterministic relaxation that tests compare with the eval form).

    alpha~ = sigmoid(result); log(1 - alpha~) = logsigmoid(-result) stays finite for any logit.
    """
    if not noise:
        return logit / tau
    u = torch.rand((2, *logit.shape), device=logit.device, dtype=torch.float32, generator=generator)
    tiny = torch.finfo(torch.float32).tiny
    gumbel = -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))
    return (logit + gumbel[0] - gumbel[1]) / tau


def straight_through_hard(logit: torch.Tensor) -> torch.Tensor:
    """Hard decision with a straight-through gradient: ``1[l > 0] - sg(sigmoid(l)) + sigmoid(l)``."""
    soft = torch.sigmoid(logit)
    return (logit > 0).to(soft.dtype) - soft.detach() + soft
