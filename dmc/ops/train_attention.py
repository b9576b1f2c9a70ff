"""Training-time DMC attention over partially accumulated keys/values.

Query i sees state j < i with the additive bias ``b_j = log(1 - alpha~_{j+1})`` (state j survives only
if the next token does not merge into it), always sees its own state j = i with bias 0, and nothing
after i. Inputs are given, so every implementation is tested on identical decisions:

    q (B, H, T, D) rotated queries;  k, v (B, H_kv, T, D) rotated pooled keys, pooled values
    keep_log (B, H_kv, T):  b_j = log(1 - alpha~_{j+1})   (0 at j = T-1; <= -1e4 hides state j)
    merge_log (B, H_kv, T): log(alpha~_{j+1})            (so that exp(b) + exp(merge_log) = 1)
Returns (B, H, T, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .triton_train_attention import fused_train_attention

# Finite stand-in for -inf: exp underflows to exactly 0 in fp32/bf16, and 0 * MASKED stays 0 (no NaN).
MASKED = -1.0e4


def train_attention_reference(q, k, v, keep_log, merge_log=None, scale: float | None = None):
    """Materialised (B, H, T, T) bias + softmax; the permanent reference."""
    B, H, T, D = q.shape
    g = H // k.shape[1]
    scale = D**-0.5 if scale is None else scale
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    bias = keep_log.repeat_interleave(g, 1)[:, :, None, :].expand(B, H, T, T)
    eye = torch.eye(T, dtype=torch.bool, device=q.device)
    bias = torch.where(eye, torch.zeros_like(bias), bias)
    scores = (q @ k.transpose(-1, -2)) * scale + bias.to(q.dtype)
    scores = scores.masked_fill(~torch.ones_like(eye).tril(), float("-inf"))
    return scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype) @ v


def train_attention_sdpa(q, k, v, keep_log, merge_log, scale: float | None = None):
    """One fused causal SDPA call, no T x T tensor: bias through extra channels plus a sentinel key.

    Channels: q' = [q * scale, 1, c_i], k'_j = [k_j, b_j, 0]; a sentinel key [0, 0, 1] is prepended
    (with a dummy query, so that plain ``is_causal`` aligns). Scores are s_ij + b_j for real keys and
    c_i = s_ii + log(alpha~_{i+1}) for the sentinel, whose value is a one-hot channel u. Because
    exp(s_ii + b_i) + exp(c_i) = exp(s_ii), ``out_i = main_i + u_i * v_i`` is exactly the attention
    with a free (bias 0) diagonal.
    """
    B, H, T, D = q.shape
    H_kv = k.shape[1]
    g = H // H_kv
    scale = D**-0.5 if scale is None else scale
    width = -(-(D + 2) // 8) * 8  # fused kernels want head dims in multiples of 8
    grouped = lambda x: x.unflatten(1, (H_kv, g))  # noqa: E731  (B, H, ...) -> (B, H_kv, g, ...)
    diag = (grouped(q) * k[:, :, None]).sum(-1).flatten(1, 2) * scale  # s_ii (B, H, T)
    work = torch.promote_types(q.dtype, torch.float32)  # log(alpha~) is fp32; don't round it to bf16 early
    merge = merge_log.clamp(min=MASKED).repeat_interleave(g, 1)
    sentinel = (diag.to(work) + merge.to(work)).clamp(min=MASKED).to(q.dtype)

    # Each operand is written once into a zeroed buffer: row 0 is the dummy query / sentinel key.
    # On CPU SDPA reads K/V per KV head (enable_gqa, measured as fast as repeated heads); fused CUDA
    # kernels do not all take GQA, so there K/V are repeated per query head.
    gqa = q.device.type == "cpu" and g > 1
    H_k = H_kv if gqa else H
    qp = q.new_zeros(B, H, T + 1, width)
    qp[:, :, 1:, :D] = q * scale
    qp[:, :, 1:, D] = 1
    qp[:, :, 1:, D + 1] = sentinel
    kp = q.new_zeros(B, H_kv, H_k // H_kv, T + 1, width)
    kp[..., 1:, :D] = k[:, :, None]
    kp[..., 1:, D] = keep_log.clamp(min=MASKED).to(q.dtype)[:, :, None]
    kp[..., 0, D + 1] = 1  # the sentinel key: only the sentinel channel is non-zero
    vp = q.new_zeros(B, H_kv, H_k // H_kv, T + 1, width)
    vp[..., 1:, :D] = v[:, :, None]
    vp[..., 0, D] = 1  # ... and its value is the one-hot channel u
    out = F.scaled_dot_product_attention(qp, kp.flatten(1, 2), vp.flatten(1, 2), is_causal=True, scale=1.0,
                                         enable_gqa=gqa)[:, :, 1:]  # drop the dummy query
    return out[..., :D] + (grouped(out[..., D : D + 1]) * v[:, :, None]).flatten(1, 2)


def train_attention_flex(q, k, v, keep_log, merge_log=None, scale: float | None = None):
    """FlexAttention with a ``score_mod`` adding the bias on the fly (no backward on CPU in torch 2.13)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    B, H, T, D = q.shape
    g = H // k.shape[1]
    keep = keep_log.to(q.dtype)

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + torch.where(q_idx == kv_idx, 0.0, keep[b, h // g, kv_idx])

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, None, None, T, T, device=q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    return fn(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=g > 1)


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


TRAIN_ATTENTION = {
    "reference": train_attention_reference,
    "sdpa": train_attention_sdpa,
    "flex": train_attention_flex,
    "triton": fused_train_attention,  # flash-style Triton kernels: CUDA (the CPU interpreter in tests)
}


def train_attention(backend: str, q, k, v, keep_log, merge_log, scale=None):
    """Dispatch; ``auto`` is the fused SDPA form (fastest measured on CPU, and fused on CUDA; the Triton kernels
    become ``auto``'s choice on CUDA once the GPU check has measured them faster there)."""
    fn = TRAIN_ATTENTION["sdpa" if backend == "auto" else backend]
    return fn(q, k, v, keep_log, merge_log, scale)
