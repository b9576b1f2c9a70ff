"""Decode attention over a quantised paged pool (``kv_bits`` 8/4), plus each pair's full-precision open slot.

    q (B, H, D); pools of ``CodedPool`` (codes (blocks, block_size, D * bits / 8) uint8, scale and minimum
    (blocks, block_size, D / group)); slots [0, lens[b, h]) of pair (b, h) are coded; ``open_k``/``open_v``
    (B, H_kv, D) one more slot per pair where ``open_live`` (B, H_kv) (DMC's open slot; None: no such slot).

The reference decodes the whole pool and runs the plain reference attention. The paged path decodes
``chunk`` blocks at a time and folds each chunk into a running softmax per pair (maximum, denominator,
weighted sum), so the decoded keys and values never exist for more than one chunk.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .decode_attention import _block_owners, decode_attention_reference
from .kv_quant import CodedPool


def decode_attention_quant_reference(q, k: CodedPool, v: CodedPool, block_table, lens, open_k=None, open_v=None,
                                     open_live=None, scale=None):
    """Decode every block, put each live open slot after its pair's coded slots, attend with the reference."""
    keys, vals = k.decode(dtype=q.dtype), v.decode(dtype=q.dtype)
    lens = lens.clone()
    if open_k is not None:
        bs = keys.shape[1]
        b, h = open_live.nonzero(as_tuple=True)
        block = block_table[b, h, lens[b, h] // bs]
        keys[block, lens[b, h] % bs] = open_k[b, h].to(q.dtype)
        vals[block, lens[b, h] % bs] = open_v[b, h].to(q.dtype)
        lens = lens + open_live.long()
    return decode_attention_reference(q, keys, vals, block_table, lens, scale)


class _Softmax(NamedTuple):
    """A running softmax per pair (rows P + 1: the last row takes blocks nobody holds): max, denominator, sum."""

    top: torch.Tensor  # (P + 1, g)
    denom: torch.Tensor  # (P + 1, g)
    num: torch.Tensor  # (P + 1, g, D)

    def fold(self, owner, scores, values) -> _Softmax:
        """Add keys with ``scores`` (N, g, S) and ``values`` (N, S, D), key group n belonging to pair owner[n]."""
        top = self.top.clone().scatter_reduce_(0, owner[:, None].expand_as(scores[..., 0]), scores.amax(-1), "amax")
        keep = torch.where(torch.isinf(self.top), 0.0, torch.exp(self.top - top))  # rescale what was summed
        p = torch.exp(scores - top[owner][..., None].clamp(min=torch.finfo(scores.dtype).min))
        denom = self.denom * keep + torch.zeros_like(self.denom).index_add_(0, owner, p.sum(-1))
        num = self.num * keep[..., None] + torch.zeros_like(self.num).index_add_(0, owner, torch.bmm(p, values))
        return _Softmax(top, denom, num)


def decode_attention_quant_paged(q, k: CodedPool, v: CodedPool, block_table, lens, open_k=None, open_v=None,
                                 open_live=None, scale=None, owned=None, chunk: int = 256):
    """The portable path: ``chunk`` blocks decoded at a time, folded into a running softmax per pair.
    ``owned``: the table's inverse when the storage keeps it (``PagedSlots.owners()``)."""
    B, H, D = q.shape
    H_kv = lens.shape[1]
    g, P = H // H_kv, B * H_kv
    scale = D**-0.5 if scale is None else scale
    work = torch.promote_types(q.dtype, torch.float32)
    owner, live = _block_owners(block_table, lens, k.codes.shape[1], owned)
    q_rows = torch.cat([q.reshape(P, g, D), q.new_zeros(1, g, D)]).to(work)
    state = _Softmax(torch.full((P + 1, g), float("-inf"), dtype=work, device=q.device),
                     torch.zeros(P + 1, g, dtype=work, device=q.device),
                     torch.zeros(P + 1, g, D, dtype=work, device=q.device))
    for start in range(0, owner.shape[0], chunk):
        stop = min(start + chunk, owner.shape[0])
        who, blocks = owner[start:stop], slice(start, stop)
        scores = torch.bmm(q_rows[who], k.decode(blocks, work).transpose(1, 2)) * scale  # (n, g, bs)
        scores = scores.masked_fill(~live[blocks, None, :], float("-inf"))
        vals = torch.where(live[blocks, :, None], v.decode(blocks, work), 0)  # dead slots may hold anything
        state = state.fold(who, scores, vals)
    if open_k is not None:
        pairs = torch.arange(P, device=q.device)
        scores = (q_rows[:P] @ open_k.reshape(P, D, 1).to(work)) * scale  # (P, g, 1)
        scores = scores.masked_fill(~open_live.reshape(P, 1, 1), float("-inf"))
        state = state.fold(pairs, scores, open_v.reshape(P, 1, D).to(work))
    denom = state.denom[..., None]
    out = torch.where(denom > 0, state.num / denom.clamp(min=torch.finfo(work).tiny), 0)
    return out[:P].to(q.dtype).reshape(B, H, D)  # pairs without slots (left padding) give 0
