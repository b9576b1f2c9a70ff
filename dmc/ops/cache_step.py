"""The arithmetic of one DMC decoding step, tensor in, tensor out: the open slot's running sums and its key/value.

``DMCLayer.step`` (dmc/cache.py) owns the state and calls these; the fused Triton update
(``triton_decode.dmc_update_triton``) computes the same in one kernel and is tested against them. Per
(sequence, KV head), with ``merge`` the hard decision of the new token t:

    merge:   S <- S + omega_t * x_t   (or, with a merge window W, the sum over the segment's last W tokens)
    append:  S <- omega_t * x_t, one more slot
    slot    <- (RoPE(S_k / S_w, position t), S_v / S_w)     written into the pair's last slot

Shapes: k_pre, v (B, H_kv, D) in the state's dtype; w (B, H_kv); live, merge, append (B, H_kv) bool (a pad
token is not live and changes nothing).
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half


def running_sums(k_sum, v_sum, w_sum, k_pre, v, w, live, merge):
    """Unbounded running sums: a merge carries the sums on, an append restarts them. -> (k_sum, v_sum, w_sum)"""
    carry = merge.to(w.dtype)
    return (torch.where(live[..., None], k_sum * carry[..., None] + w[..., None] * k_pre, k_sum),
            torch.where(live[..., None], v_sum * carry[..., None] + w[..., None] * v, v_sum),
            torch.where(live, w_sum * carry + w, w_sum))


def shift_ring(ring_k, ring_v, ring_w, seg_len, k_pre, v, w, live, merge, append):
    """The last W raw tokens (rings (B, H_kv, W[, D]), oldest first) with the new token put last, and the open
    segment's length (an append starts a segment of 1). -> (ring_k, ring_v, ring_w, seg_len)"""
    B, H = live.shape

    def shift(ring, new):
        moved = torch.cat([ring[:, :, 1:], new[:, :, None]], 2)
        return torch.where(live.view(B, H, *[1] * (ring.dim() - 2)), moved, ring)

    return shift(ring_k, k_pre), shift(ring_v, v), shift(ring_w, w), segment_length(seg_len, merge, append)


def segment_length(seg_len, merge, append):
    """The open segment's length after the token: an append starts a segment of 1, a merge lengthens it."""
    return torch.where(append, 1, torch.where(merge, seg_len + 1, seg_len))


def segment_sums(ring_k, ring_v, ring_w, seg_len):
    """Sums over the open segment's last min(seg_len, W) tokens of the ring, as the training accumulation with a
    merge window. -> (k_sum, v_sum, w_sum)"""
    W = ring_w.shape[-1]
    in_seg = torch.arange(W, device=ring_w.device) >= W - seg_len.clamp(max=W)[..., None]
    weights = ring_w * in_seg  # (B, H_kv, W)
    return (weights[..., None] * ring_k).sum(2), (weights[..., None] * ring_v).sum(2), weights.sum(-1)


def open_slot_state(k_sum, v_sum, w_sum, cos, sin, key_dtype):
    """The open slot's key (the weighted mean, in ``key_dtype``, RoPE at the current position; cos/sin (B, D))
    and value (the weighted mean, in the sums' dtype). -> (key, value) (B, H_kv, D)"""
    key = (k_sum / w_sum[..., None]).to(key_dtype)
    key = key * cos[:, None] + rotate_half(key) * sin[:, None]
    return key, v_sum / w_sum[..., None]
