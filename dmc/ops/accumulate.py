"""Partial accumulation of keys/values into the currently open slot (training-time form of merging).

For each (sequence, KV head), with decisions alpha_t (alpha_0 forced to 0) and weights omega_t:

    acc_i = alpha_i * acc_{i-1} + omega_i * x_i,   c_i = alpha_i * c_{i-1} + omega_i,   xbar_i = acc_i / c_i

With a window W the sum is truncated to the last W tokens (the reference uses W = 12):

    acc_i = sum_{t = i-W+1}^{i} (prod_{s=t+1}^{i} alpha_s) * omega_t * x_t      (same for c_i)

Shapes: x (B, H_kv, T, E), alpha and omega (B, H_kv, T). Returns xbar (B, H_kv, T, E), c (B, H_kv, T).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def accumulate_reference(x: torch.Tensor, alpha: torch.Tensor, omega: torch.Tensor, window: int | None):
    """Token-by-token loop; the permanent, obviously-correct twin of :func:`accumulate`."""
    B, H, T, E = x.shape
    alpha = alpha.clone()
    alpha[..., 0] = 0
    out, norm = [], []
    for i in range(T):
        start = 0 if not window else max(0, i - window + 1)
        acc = torch.zeros_like(x[..., 0, :])
        c = torch.zeros_like(omega[..., 0])
        coeff = torch.ones_like(omega[..., 0])
        for t in range(i, start - 1, -1):  # newest to oldest: coeff = prod_{s=t+1}^{i} alpha_s
            acc = acc + (coeff * omega[..., t])[..., None] * x[..., t, :]
            c = c + coeff * omega[..., t]
            coeff = coeff * alpha[..., t]
        out.append(acc / c[..., None])
        norm.append(c)
    return torch.stack(out, dim=2), torch.stack(norm, dim=2)


def _accumulate_windowed(x, alpha, omega, window: int):
    T = x.shape[2]
    # A[b, h, i, w] = alpha of token i - (W - 1) + w  (zero-padded before token 0)
    a_win = F.pad(alpha, (window - 1, 0)).unfold(-1, window, 1)  # (B, H, T, W)
    after = torch.cat([a_win[..., 1:], torch.ones_like(a_win[..., :1])], dim=-1)
    coeff = after.flip(-1).cumprod(-1).flip(-1)  # coeff[w] = prod of alphas after token w, up to i
    w_win = F.pad(omega, (window - 1, 0)).unfold(-1, window, 1) * coeff  # (B, H, T, W)
    # W shifted multiply-adds: an unfolded (B, H, T, E, W) copy of x would be W times the size of x
    x_pad = F.pad(x, (0, 0, window - 1, 0))
    acc = x * w_win[..., -1:]
    for w in range(window - 1):
        acc = acc.addcmul(x_pad[:, :, w : w + T], w_win[..., w : w + 1])
    c = w_win.sum(-1)
    return acc / c[..., None], c


def _accumulate_unbounded(x, alpha, omega, chunk: int = 64):
    # Chunked scan: exact products inside a chunk (C x C, via cumprod, safe for alpha = 0),
    # a carried (acc, c) across chunks.
    B, H, T, E = x.shape
    carry_acc = x.new_zeros(B, H, E)
    carry_c = omega.new_zeros(B, H)
    outs, norms = [], []
    for s in range(0, T, chunk):
        a = alpha[..., s : s + chunk]  # (B, H, C)
        C = a.shape[-1]
        lower = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1)  # i > t
        g = torch.where(lower, a[..., :, None], torch.ones_like(a[..., :, None]))  # (B, H, C, C)
        prod = g.cumprod(dim=-2).masked_fill(~torch.ones_like(lower).tril(), 0.0)  # prod_{t<u<=i} alpha_u
        from_carry = a.cumprod(-1)  # prod_{s<=u<=i} alpha_u
        w = omega[..., s : s + chunk]
        acc = prod @ (w[..., None] * x[..., s : s + chunk, :]) + from_carry[..., None] * carry_acc[..., None, :]
        c = (prod @ w[..., None]).squeeze(-1) + from_carry * carry_c[..., None]
        outs.append(acc)
        norms.append(c)
        carry_acc, carry_c = acc[..., -1, :], c[..., -1]
    acc, c = torch.cat(outs, dim=2), torch.cat(norms, dim=2)
    return acc / c[..., None], c


def accumulate(x: torch.Tensor, alpha: torch.Tensor, omega: torch.Tensor, window: int | None, out_dtype=None):
    """Parallel partial accumulation (see module docstring); alpha_0 is treated as 0.

    Computed in at least fp32 (the running average divides by c_i); xbar is returned in ``out_dtype``
    (default: x's dtype), c in the working precision.
    """
    dtype = out_dtype or x.dtype
    work = torch.promote_types(dtype, torch.float32)
    x, alpha, omega = x.to(work), alpha.to(work), omega.to(work)
    alpha = torch.cat([torch.zeros_like(alpha[..., :1]), alpha[..., 1:]], dim=-1)
    if window:
        xbar, c = _accumulate_windowed(x, alpha, omega, window)
    else:
        xbar, c = _accumulate_unbounded(x, alpha, omega)
    return xbar.to(dtype), c
