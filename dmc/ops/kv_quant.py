"""Group-wise integer codes for closed KV slots: the reference codec that every quantised path is tested against.

A slot's vector x (D,) is cut into groups of ``group`` channels; each group is stored as unsigned ``bits``-bit
codes with its own scale and minimum (asymmetric, as KIVI and FlexGen):

    scale = (max - min) / (2**bits - 1)        code = round((x - min) / scale)        x' = min + code * scale

so |x - x'| <= scale / 2 per element (plus the rounding of scale and min to their storage dtype). Every slot
is coded alone (per-token groups along the head dimension, for keys as for values): a DMC slot closes on its
own, when its pair appends the next one, and is never coded again. 4-bit codes are packed two per byte
(low nibble first); 8-bit codes are one byte each.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

KV_BITS = (16, 8, 4)  # 16: no codes, the pool keeps the model's dtype
# Channels per group when none is set, per width: measured on the demo model (docs/quantised_slots.md):
# at int8, 32-channel groups are indistinguishable from 16 bits; at int4, 16-channel groups cost half the
# perplexity of 32-channel ones (+1.7% against +3.5%) for 4 more bytes per key.
DEFAULT_GROUP = {8: 32, 4: 16}


def check_bits(bits: int) -> int:
    if bits not in KV_BITS:
        raise ValueError(f"kv bits must be one of {', '.join(map(str, KV_BITS))} (got {bits})")
    return bits


def code_width(head_dim: int, bits: int) -> int:
    """Bytes of one slot's codes."""
    return head_dim * bits // 8


def resolve_group(bits: int, group: int | None, head_dim: int) -> int:
    """The channels per group a cache of ``bits`` uses: ``group`` (at most the head dim), or when None the
    width's default, cut to a divisor of the head dim. Raises for an explicit group that does not divide it."""
    if group is None:
        return math.gcd(DEFAULT_GROUP.get(bits, head_dim), head_dim)
    group = min(group, head_dim)
    num_groups(head_dim, group)
    return group


def num_groups(head_dim: int, group: int) -> int:
    if head_dim % group:
        raise ValueError(f"head dim {head_dim} is not a multiple of the quantisation group {group}")
    return head_dim // group


def quantize(x: torch.Tensor, bits: int, group: int, param_dtype=torch.float16):
    """x (..., D) -> (codes (..., D * bits / 8) uint8, scale (..., D / group), minimum (..., D / group)).

    Non-finite inputs are a caller's bug, but they must not spread: NaN groups code to 0 with scale 0."""
    *lead, D = x.shape
    g = x.float().reshape(*lead, num_groups(D, group), group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / (2**bits - 1)).to(param_dtype)
    lo = lo.to(param_dtype)
    # the codes are taken against the stored (rounded) scale and minimum, so decoding sees the same numbers
    s, m = scale.float()[..., None], lo.float()[..., None]
    codes = torch.where(s > 0, ((g - m) / torch.where(s > 0, s, 1)).round(), 0).clamp(0, 2**bits - 1)
    codes = torch.nan_to_num(codes, nan=0.0).to(torch.uint8).reshape(*lead, D)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, torch.nan_to_num(scale, nan=0.0), torch.nan_to_num(lo, nan=0.0)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int, dtype=torch.float32):
    """Inverse of ``quantize``: (..., D) in ``dtype``."""
    if bits == 4:
        codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)
    *lead, D = codes.shape
    G = scale.shape[-1]
    x = codes.reshape(*lead, G, D // G).float() * scale.float()[..., None] + minimum.float()[..., None]
    return x.reshape(*lead, D).to(dtype)


class CodedPool(NamedTuple):
    """One coded pool (keys or values): codes (blocks, block_size, D * bits / 8), scale and minimum
    (blocks, block_size, D / group)."""

    codes: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    bits: int

    def decode(self, index=slice(None), dtype=torch.float32) -> torch.Tensor:
        """The slots at ``index`` (anything that indexes the pool's leading dims), decoded to ``dtype``."""
        return dequantize(self.codes[index], self.scale[index], self.minimum[index], self.bits, dtype)


def error_bound(scale: torch.Tensor, minimum: torch.Tensor, group: int) -> torch.Tensor:
    """Per element (..., D): the most ``dequantize(quantize(x))`` may differ from x: half a step, plus the
    fp16 rounding of the stored minimum and of the top code's scale (code <= 2**bits - 1)."""
    s, m = scale.float(), minimum.float()
    eps = torch.finfo(scale.dtype).eps
    slack = eps * (m.abs() + s * 255) + 1e-6
    return (s / 2 + slack).repeat_interleave(group, dim=-1)


def round_trip_across_slots(x: torch.Tensor, keep: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """KIVI's key grouping, for measuring it against ours: each channel coded over ``group`` consecutive
    closed slots (one scale and minimum per channel per group) rather than each slot alone.

    x (B, H, T, D) states; keep (B, H, T) bool, the closed slots (in order along T). Returns x with every kept
    state replaced by what such codes give back; the other states are returned unchanged. A trailing group of
    fewer than ``group`` slots is coded over what it has. At equal ``group`` it costs the same bytes per slot as
    per-token groups (D / group scales and minima a slot), so the two compare at equal memory."""
    if bits == 4 and group % 2:
        raise ValueError(f"int4 codes pack two a byte: use an even group of slots (got {group})")
    out = x.clone()
    for b, h in keep.any(-1).nonzero().tolist():
        rows = x[b, h][keep[b, h]]  # (S, D) closed slots in order
        S, D = rows.shape
        pad = -S % group  # repeat the last slot: min and max, hence the codes of the rest, do not change
        padded = torch.cat([rows, rows[-1:].expand(pad, D)]).reshape(-1, group, D).transpose(1, 2)
        back = dequantize(*quantize(padded, bits, group), bits, x.dtype)  # (S / group, D, group): one group a row
        out[b, h][keep[b, h]] = back.transpose(1, 2).reshape(-1, D)[:S]
    return out
