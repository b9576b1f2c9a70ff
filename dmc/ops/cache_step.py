"""One DMC decoding step on a ``DMCLayer``: append or merge each pair's new token, then write its open slot.

The PyTorch reference of the fused Triton update (``triton_decode.cache_step_triton``), tested against it.
Per (sequence, KV head), with ``merge`` the hard decision of the new token t:

    merge:   S <- S + omega_t * x_t   (or, with a merge window W, the sum over the segment's last W tokens)
    append:  S <- omega_t * x_t, one more slot
    slot    <- (RoPE(S_k / S_w, position t), S_v / S_w)     written into the pair's last slot

A sequence's first real token always appends; padding tokens (``valid`` False) leave the cache untouched.
"""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import rotate_half


def _rope(x, cos, sin):  # x (B, H_kv, D); cos/sin (B, D)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def step_masks(layer, k_pre: torch.Tensor, merge: torch.Tensor, valid: torch.Tensor):
    """(live, merge, append) per (B, H_kv) for one step; initialises the layer's state on first use (every
    step implementation starts here)."""
    B, H, _ = k_pre.shape
    if not layer.is_initialized:
        layer._init_state(B, k_pre.dtype, k_pre.device)
    live = valid[:, None].expand(B, H)
    merge = merge & layer.started[:, None] & live
    return live, merge, live & ~merge


def _windowed_sums(layer, k_pre, v, w, live, merge, append) -> None:
    """Running sums over the open segment's last W raw tokens (the ring), as the training accumulation."""
    B, H = live.shape
    shift = lambda ring, new: torch.where(  # noqa: E731
        live.view(B, H, *[1] * (ring.dim() - 2)), torch.cat([ring[:, :, 1:], new[:, :, None]], 2), ring
    )
    layer.ring_k, layer.ring_v, layer.ring_w = shift(layer.ring_k, k_pre), shift(layer.ring_v, v), shift(layer.ring_w, w)
    layer.seg_len = torch.where(append, 1, torch.where(merge, layer.seg_len + 1, layer.seg_len))
    W = layer.window
    in_seg = torch.arange(W, device=layer.device) >= W - layer.seg_len.clamp(max=W)[..., None]
    weights = layer.ring_w * in_seg  # (B, H_kv, W)
    layer.k_sum = (weights[..., None] * layer.ring_k).sum(2)
    layer.v_sum = (weights[..., None] * layer.ring_v).sum(2)
    layer.w_sum = weights.sum(-1)


def _running_sums(layer, k_pre, v, w, live, merge) -> None:
    """Unbounded running sums: a merge carries the sums on, an append restarts them."""
    carry = merge.to(w.dtype)
    layer.k_sum = torch.where(live[..., None], layer.k_sum * carry[..., None] + w[..., None] * k_pre, layer.k_sum)
    layer.v_sum = torch.where(live[..., None], layer.v_sum * carry[..., None] + w[..., None] * v, layer.v_sum)
    layer.w_sum = torch.where(live, layer.w_sum * carry + w, layer.w_sum)


def cache_step(layer, k_pre, v, omega, merge, valid, cos, sin) -> None:
    """Append or merge one token per sequence into ``layer`` (a ``DMCLayer``).

    k_pre, v (B, H_kv, D) (decision channel already zeroed); omega (B, H_kv); merge (B, H_kv) bool;
    valid (B,) False for left-padding tokens; cos, sin (B, D) of the token's position.
    """
    live, merge, append = step_masks(layer, k_pre, merge, valid)
    sd = layer.state_dtype
    k_pre, v, w = k_pre.to(sd), v.to(sd), omega.to(sd)
    if layer.window:
        _windowed_sums(layer, k_pre, v, w, live, merge, append)
    else:
        _running_sums(layer, k_pre, v, w, live, merge)
    slot = torch.where(append, layer.lens, layer.lens - 1)
    layer.allocate(append & (slot % layer.block_size == 0), slot // layer.block_size)
    layer.lens = layer.lens + append.long()
    key = _rope((layer.k_sum / layer.w_sum[..., None]).to(layer.dtype), cos, sin)
    val = layer.v_sum / layer.w_sum[..., None]
    b, h = live.nonzero(as_tuple=True)
    layer.write_open(b, h, slot[b, h], key[b, h], val[b, h], append[b, h])
    layer.started = layer.started | valid
