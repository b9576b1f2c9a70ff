"""Decode attention of one new query per sequence over each (sequence, KV head)'s live slots.

    q (B, H, D) rotated queries; slots of pair (b, h_kv): keys/values [0, lens[b, h_kv]) in a paged
    pool (num_blocks, block_size, D) addressed by ``block_table`` (B, H_kv, max_blocks).
Returns (B, H, D). Query head h reads KV head h // g.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gather_slots(pool: torch.Tensor, block_table: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Padded view of every pair's first ``n_blocks`` blocks: (B, H_kv, n_blocks * block_size, D)."""
    B, H_kv, _ = block_table.shape
    table = block_table[..., :n_blocks].clamp(min=0)  # unallocated (-1) entries read block 0, masked later
    blocks = pool[table]  # (B, H_kv, n_blocks, block_size, D)
    return blocks.reshape(B, H_kv, -1, pool.shape[-1])


def decode_attention_reference(q, k_pool, v_pool, block_table, lens, scale=None, return_slot_probs=False):
    """Loop over (sequence, KV head) pairs, reading live slots one by one: the permanent reference.

    ``return_slot_probs``: also (num_blocks, block_size) attention probabilities per pool slot, averaged
    over the query heads of the slot's group (0 for dead and unreferenced slots); eviction policies
    score slots with them."""
    B, H, D = q.shape
    H_kv = lens.shape[1]
    g = H // H_kv
    bs = k_pool.shape[1]
    scale = D**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    probs = torch.zeros(k_pool.shape[:2], dtype=torch.promote_types(q.dtype, torch.float32), device=q.device)
    for b in range(B):
        for h in range(H_kv):
            n = int(lens[b, h])
            if n == 0:  # a sequence still in its left padding has no slots: output 0, like the kernels
                out[b, h * g : (h + 1) * g] = 0
                continue
            keys = torch.stack([k_pool[block_table[b, h, s // bs], s % bs] for s in range(n)])  # (n, D)
            vals = torch.stack([v_pool[block_table[b, h, s // bs], s % bs] for s in range(n)])
            qh = q[b, h * g : (h + 1) * g]  # (g, D)
            p = ((qh @ keys.T) * scale).softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32))
            out[b, h * g : (h + 1) * g] = (p.to(q.dtype) @ vals).to(q.dtype)
            for s in range(n):
                probs[block_table[b, h, s // bs], s % bs] = p[:, s].mean()
    return (out, probs) if return_slot_probs else out


def decode_attention_padded(q, keys, values, lens, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, D) over each pair's slots already gathered, keys, values (B, H_kv, S, D), of which the first ``lens``
    (B, H_kv) live: (output (B, H, D), attention per slot (B, H_kv, S), group mean, 0 where dead; a pair without slots
    gives 0). The reference's ``return_slot_probs`` per pair instead of per pool slot, in one batched pass: the
    policies score slots with it."""
    B, H, D = q.shape
    H_kv, S = keys.shape[1], keys.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)
    scores = (q.view(B, H_kv, H // H_kv, D) @ keys.transpose(-1, -2)).to(work) * scale
    live = torch.arange(S, device=q.device) < lens[..., None]  # (B, H_kv, S)
    p = scores.masked_fill(~live[:, :, None], float("-inf")).softmax(-1)
    p = torch.where((lens > 0)[..., None, None], p, 0)  # no slots yet (left padding): 0, not NaN
    return (p.to(q.dtype) @ values).reshape(B, H, D), p.mean(2)


def decode_attention_sdpa(q, k_pool, v_pool, block_table, lens, scale=None):
    """Portable path: gather blocks to a padded (B, H_kv, S, D) view, mask dead slots, one SDPA call.

    The g query heads of a group are laid out as g queries of one KV head, so K/V are never repeated.
    """
    B, H, D = q.shape
    H_kv = lens.shape[1]
    bs = k_pool.shape[1]
    n_blocks = max(1, -(-int(lens.max()) // bs))
    keys = gather_slots(k_pool, block_table, n_blocks)
    vals = gather_slots(v_pool, block_table, n_blocks)
    live = torch.arange(keys.shape[2], device=q.device) < lens[..., None]  # (B, H_kv, S)
    # dead slots may hold anything (unwritten or unallocated blocks): 0 * NaN would still poison p @ V
    keys = torch.where(live[..., None], keys, 0)
    vals = torch.where(live[..., None], vals, 0)
    qg = q.view(B, H_kv, H // H_kv, D)
    out = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=live[:, :, None, :], scale=scale)
    out = torch.where((lens > 0)[..., None, None], out, 0)  # no slots yet (left padding): 0, not NaN
    return out.reshape(B, H, D)


def _block_owners(block_table, lens, bs: int, owned=None) -> tuple[torch.Tensor, torch.Tensor]:
    """For pool blocks 0..U-1: ``owner`` (U,) the flat pair index b * H_kv + h holding the block (B * H_kv:
    nobody), ``live`` (U, bs) which of its slots are live. ``owned``: the table's inverse (pair, column) as
    ``PagedSlots.owners()`` keeps it (pair -1: nobody); else it is built here from the table (U: one past
    the highest block referenced)."""
    B, H_kv = lens.shape
    P = B * H_kv
    if owned is None:
        held = block_table >= 0
        ids = block_table[held]
        U = int(ids.max()) + 1 if ids.numel() else 1
        pair = torch.full((U,), -1, dtype=torch.long, device=lens.device)
        pair[ids] = torch.arange(P, device=lens.device).view(B, H_kv, 1).expand_as(block_table)[held]
        col = torch.zeros(U, dtype=torch.long, device=lens.device)
        col[ids] = torch.arange(block_table.shape[-1], device=lens.device).expand_as(block_table)[held]
    else:
        pair, col = owned
    owner = torch.where(pair >= 0, pair, P)  # row P: blocks nobody references
    pair_lens = torch.cat([lens.reshape(-1), lens.new_zeros(1)])  # (P + 1,)
    return owner, (col * bs)[:, None] + torch.arange(bs, device=lens.device) < pair_lens[owner][:, None]


def decode_attention_paged(q, k_pool, v_pool, block_table, lens, scale=None, return_slot_probs=False, owned=None):
    """Portable path that reads the pool in place: one small matmul per block, softmax across a pair's blocks.

    Gathering every pair's blocks into a padded tensor copies the whole compressed cache each step; here
    block i's scores come from ``q[owner[i]] @ k_pool[i]^T``, the softmax maximum and denominator are
    reduced per pair with scatter ops, and ``p @ v_pool[i]`` is summed per pair. Blocks that no pair
    references are ignored. Every slot of a referenced block must be finite, live or not (0 * NaN would
    reach the output through ``p @ V``): ``DMCCache`` zero-fills its blocks. ``return_slot_probs``: as in
    the reference.
    """
    B, H, D = q.shape
    H_kv = lens.shape[1]
    g, P = H // H_kv, B * H_kv
    scale = D**-0.5 if scale is None else scale
    owner, live = _block_owners(block_table, lens, k_pool.shape[1], owned)
    U = owner.shape[0]
    work = torch.promote_types(q.dtype, torch.float32)
    q_rows = torch.cat([q.reshape(P, g, D), q.new_zeros(1, g, D)])
    scores = torch.bmm(q_rows[owner], k_pool[:U].transpose(1, 2)).to(work) * scale  # (U, g, bs)
    scores = scores.masked_fill(~live[:, None, :], float("-inf"))
    top = torch.full((P + 1, g), float("-inf"), dtype=work, device=q.device)
    top = top.scatter_reduce_(0, owner[:, None].expand(U, g), scores.amax(-1), "amax")
    p = torch.exp(scores - top[owner][..., None].clamp(min=torch.finfo(work).min))  # dead: exp(-inf) = 0
    denom = torch.zeros(P + 1, g, dtype=work, device=q.device).index_add_(0, owner, p.sum(-1))
    num = torch.zeros(P + 1, g, D, dtype=work, device=q.device)
    num = num.index_add_(0, owner, torch.bmm(p.to(v_pool.dtype), v_pool[:U]).to(work))
    out = torch.where(denom[..., None] > 0, num / denom[..., None].clamp(min=torch.finfo(work).tiny), 0)
    out = out[:P].to(q.dtype).reshape(B, H, D)  # pairs without slots (left padding) give 0
    if not return_slot_probs:
        return out
    probs = torch.zeros(k_pool.shape[:2], dtype=work, device=q.device)
    probs[:U] = (p / denom[owner][..., None].clamp(min=torch.finfo(work).tiny)).mean(1)
    return out, probs


def flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def decode_attention_flash(q, k_pool, v_pool, block_table, lens, scale=None):
    """flash-attn ``flash_attn_with_kvcache`` with (sequence x KV head) pairs flattened into the batch.

    Each pair is one "sequence" of length ``lens[b, h]`` with its own block table row and one KV head;
    its g query heads are that sequence's query heads. flash-attn 2 needs block_size % 256 == 0.
    """
    try:  # a try block also keeps transformers' remote-code import check from demanding flash-attn
        from flash_attn import flash_attn_with_kvcache
    except ImportError as err:
        raise ImportError("dmc_decode_backend='flash' needs flash-attn (CUDA): pip install flash-attn") from err

    B, H, D = q.shape
    H_kv = lens.shape[1]
    bs = k_pool.shape[1]
    if bs % 256:
        raise ValueError(f"flash-attn paged decoding needs dmc_block_size % 256 == 0 (got {bs}); use 'sdpa'")
    out = flash_attn_with_kvcache(
        q.reshape(B * H_kv, 1, H // H_kv, D),
        k_pool[:, :, None, :],
        v_pool[:, :, None, :],
        cache_seqlens=lens.reshape(-1).to(torch.int32),
        block_table=block_table.reshape(B * H_kv, -1).clamp(min=0).to(torch.int32),
        softmax_scale=scale,
        causal=False,
    )
    return out.reshape(B, H, D)
