"""Prompt attention for a quantised cache (``kv_bits`` 8/4): what token-by-token decoding on the codes computes.

When query i is decoded, the states it sees before its own are closed slots, read back from their codes, and its
own state is the open slot, still in full precision. The one-pass prefill must attend the same way, or a prompt's
logits (perplexity, a needle's answer) would not show what the codes cost. So this is ``train_attention``'s
reference with two key/value sets: the decoded codes of every state off the diagonal, the exact state on it.

    q (B, H, T, D) rotated queries; k, v (B, H_kv, T, D) pooled states (full precision);
    k_coded, v_coded: the same states as their closed slots hold them (``PagedSlots.round_trip``);
    keep_log (B, H_kv, T) as in ``train_attention`` (<= -1e4 hides a state: merged into the next, or padding).
Returns (B, H, T, D).
"""

from __future__ import annotations

import torch


def prefill_attention_quant(q, k, v, k_coded, v_coded, keep_log, scale: float | None = None):
    """Materialised (B, H, T, T) scores, as the training reference; the eval-time prompt of a quantised cache."""
    B, H, T, D = q.shape
    g = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)
    rep = lambda x: x.repeat_interleave(g, 1).to(work)  # noqa: E731  (B, H_kv, ...) -> (B, H, ...)
    qw = q.to(work)
    scores = (qw @ rep(k_coded).transpose(-1, -2)) * scale + rep(keep_log)[:, :, None, :]
    own = (qw * rep(k)).sum(-1) * scale  # (B, H, T): each query's own (open) state, bias 0
    eye = torch.eye(T, dtype=torch.bool, device=q.device)
    scores = torch.where(eye, own[..., None], scores).masked_fill(~torch.ones_like(eye).tril(), float("-inf"))
    p = scores.softmax(-1)
    out = p.masked_fill(eye, 0) @ rep(v_coded) + p.diagonal(dim1=-2, dim2=-1)[..., None] * rep(v)
    return out.to(q.dtype)
