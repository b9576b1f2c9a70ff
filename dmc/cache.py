"""``DMCCache``: a transformers ``Cache`` whose every (sequence, layer, KV head) holds its own number of slots.

Slots live in a paged pool per layer: blocks of ``block_size`` slots, handed out on demand, so memory
follows the slots really used. Only the last slot of a pair is ever rewritten (a merge); its running
sums (pre-RoPE key, value, weight; fp32) are kept beside the pool, and with a merge window W the last
W raw tokens of the open segment too, so that a merged slot averages at most W tokens, as in training.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.models.llama.modeling_llama import rotate_half

from .metrics import head_dim


class DMCCacheError(RuntimeError):
    """The cache was used in a way DMC does not support; the message says what to do instead."""


def _rope(x, cos, sin):  # x (B, H_kv, D); cos/sin (B, D)
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class PagedSlots:
    """Per (sequence, KV head) lists of key/value slots in one paged pool per layer: the storage that the DMC
    cache and every baseline cache policy share, so that their bytes are counted the same way.

    ``block_table[b, h, j]`` is the pool block holding slots ``j * block_size ..`` of pair (b, h) (-1: none);
    ``lens[b, h]`` its number of live slots. Blocks are handed out on demand (released blocks first), and
    every block is zero-filled when the pool grows.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int):
        self.num_kv_heads, self.head_dim, self.block_size = num_kv_heads, head_dim, block_size

    def _init_pool(self, batch: int, dtype, device) -> None:
        H, D = self.num_kv_heads, self.head_dim
        self.dtype, self.device = dtype, device
        self.k_pool = torch.empty(0, self.block_size, D, dtype=dtype, device=device)
        self.v_pool = torch.empty_like(self.k_pool)
        self.used_blocks = 0  # high-water mark of the pool
        self.free_blocks = torch.empty(0, dtype=torch.long, device=device)  # released, below the mark
        self.block_table = torch.full((batch, H, 0), -1, dtype=torch.long, device=device)
        self.lens = torch.zeros(batch, H, dtype=torch.long, device=device)

    def _ensure_blocks(self, extra: int) -> None:
        need = self.used_blocks + extra
        if need > self.k_pool.shape[0]:
            grow = max(need, int(self.k_pool.shape[0] * 1.25) + 1) - self.k_pool.shape[0]
            # zeros, not garbage: the paged attention multiplies dead slots by 0, and 0 * NaN is NaN
            pad = self.k_pool.new_zeros(grow, self.block_size, self.head_dim)
            self.k_pool = torch.cat([self.k_pool, pad])
            self.v_pool = torch.cat([self.v_pool, pad])

    def _grow_table(self, width: int) -> None:
        if width > self.block_table.shape[-1]:
            pad = self.block_table.new_full((*self.block_table.shape[:2], width - self.block_table.shape[-1]), -1)
            self.block_table = torch.cat([self.block_table, pad], dim=-1)

    def _take_blocks(self, n: int) -> torch.Tensor:
        """``n`` block ids: released ones first, then fresh ones above the high-water mark."""
        reuse = min(n, self.free_blocks.numel())
        fresh = n - reuse
        self._ensure_blocks(fresh)
        ids = torch.cat([self.free_blocks[:reuse], self.used_blocks + torch.arange(fresh, device=self.device)])
        self.free_blocks = self.free_blocks[reuse:]
        self.used_blocks += fresh
        return ids

    def _allocate(self, want: torch.Tensor, block_col: torch.Tensor) -> None:
        """Give a block to every pair where ``want`` (B, H_kv), at table column ``block_col``."""
        n = int(want.sum())
        if n == 0:
            return
        ids = self._take_blocks(n)
        self._grow_table(int(block_col[want].max()) + 1)
        b, h = want.nonzero(as_tuple=True)
        self.block_table[b, h, block_col[b, h]] = ids

    def _allocate_runs(self, n_blocks: torch.Tensor) -> None:
        """Give pair (b, h) ``n_blocks[b, h]`` blocks at table columns 0.. (empty table)."""
        total, width = int(n_blocks.sum()), int(n_blocks.max()) if n_blocks.numel() else 0
        self._grow_table(width)
        if total == 0:
            return
        ids = self._take_blocks(total)
        first = n_blocks.flatten().cumsum(0).view_as(n_blocks) - n_blocks  # (B, H_kv): the pair's first id in ids
        col = torch.arange(width, device=self.device)
        at = (first[..., None] + col).clamp(max=total - 1)
        self.block_table[..., :width] = torch.where(col < n_blocks[..., None], ids[at], -1)

    def _release(self, b: torch.Tensor, h: torch.Tensor, col: torch.Tensor) -> None:
        """Return the blocks at table column ``col`` of pairs (b, h) to the free list."""
        ids = self.block_table[b, h, col]
        self.block_table[b, h, col] = -1
        self.free_blocks = torch.cat([self.free_blocks, ids[ids >= 0]])

    def _write(self, b, h, slot, keys, values) -> None:
        block = self.block_table[b, h, slot // self.block_size]
        self.k_pool[block, slot % self.block_size] = keys.to(self.dtype)
        self.v_pool[block, slot % self.block_size] = values.to(self.dtype)

    def _select_pool(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat sequences; blocks are copied, never shared, and the pool is compacted."""
        table = self.block_table[index]
        live = table >= 0
        new_ids = live.flatten().long().cumsum(0).view_as(table) - 1
        self.k_pool, self.v_pool = self.k_pool[table[live]], self.v_pool[table[live]]
        self.used_blocks = int(live.sum())
        self.free_blocks = self.free_blocks[:0]
        self.block_table = torch.where(live, new_ids, -1)
        self.lens = self.lens[index]

    def allocated_bytes(self) -> int:
        """Bytes of the slot blocks handed out (keys and values)."""
        if not getattr(self, "is_initialized", False):
            return 0
        blocks = self.used_blocks - self.free_blocks.numel()
        return 2 * blocks * self.block_size * self.head_dim * self.k_pool.element_size()

    def pool_bytes(self) -> int:
        return 2 * self.k_pool.numel() * self.k_pool.element_size() if getattr(self, "is_initialized", False) else 0


class SlotCacheLayer(PagedSlots, CacheLayerMixin):
    """A transformers cache layer over paged slots, filled by its own attention code, never by ``update``.
    Subclasses define ``_init_state`` and ``update_hint`` (what to do instead of a plain update)."""

    is_compileable = False
    is_sliding = False
    supports_early_init = False
    update_hint = ""

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int):
        PagedSlots.__init__(self, num_kv_heads, head_dim, block_size)
        CacheLayerMixin.__init__(self)
        self.seen_tokens = 0

    def lazy_initialization(self, key_states, value_states) -> None:
        self._init_state(key_states.shape[0], key_states.dtype, key_states.device)

    def update(self, key_states, value_states, *args, **kwargs):
        raise DMCCacheError(self.update_hint)

    def get_seq_length(self) -> int:
        return self.seen_tokens

    def get_max_length(self) -> int:
        return -1

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        self.is_initialized = False
        self.seen_tokens = 0


class DMCLayer(SlotCacheLayer):
    update_hint = ("DMCCache is filled by DMC attention layers (prefill/step); it cannot take plain key/value "
                   "updates. Use it with a dmc_llama model, or a DynamicCache with a vanilla Llama.")

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int, window: int | None):
        super().__init__(num_kv_heads, head_dim, block_size)
        self.window = window

    # ---- allocation ------------------------------------------------------------------------------
    def _init_state(self, batch: int, dtype, device) -> None:
        H, D = self.num_kv_heads, self.head_dim
        self._init_pool(batch, dtype, device)
        self.started = torch.zeros(batch, dtype=torch.bool, device=device)
        self.state_dtype = sd = torch.promote_types(dtype, torch.float32)  # running sums: fp32 or better
        self.k_sum = torch.zeros(batch, H, D, dtype=sd, device=device)
        self.v_sum = torch.zeros_like(self.k_sum)
        self.w_sum = torch.zeros(batch, H, dtype=sd, device=device)
        if self.window:
            W = self.window
            self.ring_k = torch.zeros(batch, H, W, D, dtype=sd, device=device)
            self.ring_v = torch.zeros_like(self.ring_k)
            self.ring_w = torch.zeros(batch, H, W, dtype=sd, device=device)
            self.seg_len = torch.zeros(batch, H, dtype=torch.long, device=device)
        self.is_initialized = True

    # ---- the two ways in: one-pass prefill and one token at a time -----------------------------------
    def prefill(self, k_bar_rot, v_bar, k_pre, v, omega, k_sum, v_sum, w_sum, alpha, valid) -> None:
        """Store a whole prompt computed in parallel (hard decisions) as slots.

        k_bar_rot, v_bar (B, H_kv, T, D): pooled states; k_sum, v_sum (B, H_kv, D) and w_sum (B, H_kv)
        the fp32 running sums of each open (last) slot; k_pre, v, omega: raw tokens (for the merge
        window); alpha (B, H_kv, T) in {0, 1} with each first real token forced to 0; valid (B, T), left
        padding only.
        """
        B, H, T, D = k_bar_rot.shape
        if not self.is_initialized:
            self._init_state(B, k_bar_rot.dtype, k_bar_rot.device)
        merge_next = torch.cat([alpha[..., 1:], torch.zeros_like(alpha[..., :1])], dim=-1) > 0
        ends = valid[:, None, :] & ~merge_next  # (B, H_kv, T): a slot closes here (or stays open at T-1)
        slot = ends.long().cumsum(-1) - 1
        self.lens = ends.sum(-1)
        self._allocate_runs(-(-self.lens // self.block_size))
        b, h, t = ends.nonzero(as_tuple=True)
        self._write(b, h, slot[b, h, t], k_bar_rot[b, h, t], v_bar[b, h, t])

        self.started = valid.any(-1)
        sd = self.state_dtype
        # Copies, not views: a view would keep the whole (B, H_kv, T, ...) prefill tensor alive in the cache.
        self.k_sum, self.v_sum, self.w_sum = (x.to(sd).clone() for x in (k_sum, v_sum, w_sum))
        if self.window:
            W = self.window
            is_start = (alpha == 0) & valid[:, None, :]
            pos = torch.arange(T, device=alpha.device)
            seg_start = torch.where(is_start, pos, -1).cummax(-1).values[..., -1]  # (B, H_kv)
            self.seg_len = torch.where(self.started[:, None], T - seg_start, 0)
            pad = max(0, W - T)
            take = lambda x: torch.nn.functional.pad(x, (0, 0, pad, 0))[..., -W:, :].to(sd).clone()  # noqa: E731
            self.ring_k, self.ring_v = take(k_pre), take(v)
            self.ring_w = take(omega[..., None])[..., 0]
        self.seen_tokens += T

    def step_masks(self, k_pre, merge, valid):
        """(live, merge, append) per (B, H_kv) for one step; a sequence's first real token always appends.
        Initialises the state on first use (every step implementation starts here)."""
        B, H, _ = k_pre.shape
        if not self.is_initialized:
            self._init_state(B, k_pre.dtype, k_pre.device)
        live = valid[:, None].expand(B, H)
        merge = merge & self.started[:, None] & live
        return live, merge, live & ~merge

    def step(self, k_pre, v, omega, merge, valid, cos, sin) -> None:
        """Append or merge one token per sequence.

        k_pre, v (B, H_kv, D) (decision channel already zeroed); omega (B, H_kv); merge (B, H_kv) bool;
        valid (B,) False for left-padding tokens, which leave the cache untouched; cos, sin (B, D).
        """
        B, H, D = k_pre.shape
        live, merge, append = self.step_masks(k_pre, merge, valid)
        sd = self.state_dtype
        k_pre, v, w = k_pre.to(sd), v.to(sd), omega.to(sd)
        wk, wv = w[..., None] * k_pre, w[..., None] * v
        if self.window:
            shift = lambda ring, new: torch.where(  # noqa: E731
                live.view(B, H, *[1] * (ring.dim() - 2)), torch.cat([ring[:, :, 1:], new[:, :, None]], 2), ring
            )
            self.ring_k, self.ring_v = shift(self.ring_k, k_pre), shift(self.ring_v, v)
            self.ring_w = shift(self.ring_w, w)
            self.seg_len = torch.where(append, 1, torch.where(merge, self.seg_len + 1, self.seg_len))
            in_seg = torch.arange(self.window, device=self.device) >= self.window - self.seg_len.clamp(max=self.window)[..., None]
            weights = self.ring_w * in_seg  # (B, H_kv, W)
            self.k_sum = (weights[..., None] * self.ring_k).sum(2)
            self.v_sum = (weights[..., None] * self.ring_v).sum(2)
            self.w_sum = weights.sum(-1)
        else:
            keep = merge.to(sd)
            self.k_sum = torch.where(live[..., None], self.k_sum * keep[..., None] + wk, self.k_sum)
            self.v_sum = torch.where(live[..., None], self.v_sum * keep[..., None] + wv, self.v_sum)
            self.w_sum = torch.where(live, self.w_sum * keep + w, self.w_sum)
        slot = torch.where(append, self.lens, self.lens - 1)
        self._allocate(append & (slot % self.block_size == 0), slot // self.block_size)
        self.lens = self.lens + append.long()
        key = _rope((self.k_sum / self.w_sum[..., None]).to(self.dtype), cos, sin)
        val = self.v_sum / self.w_sum[..., None]
        b, h = live.nonzero(as_tuple=True)
        self._write(b, h, slot[b, h], key[b, h], val[b, h])
        self.started = self.started | valid

    # ---- transformers Cache API (beyond SlotCacheLayer) ----------------------------------------------
    def select_rows(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat sequences (beam search, num_return_sequences); blocks are copied, never shared."""
        if not self.is_initialized:
            return
        index = index.to(self.device)
        self._select_pool(index)
        names = ["started", "k_sum", "v_sum", "w_sum"]
        names += ["ring_k", "ring_v", "ring_w", "seg_len"] if self.window else []
        for name in names:
            setattr(self, name, getattr(self, name)[index])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.select_rows(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self.select_rows(torch.arange(self.lens.shape[0], device=self.device).repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.select_rows(indices)

    def crop(self, tokens_to_remove: int) -> None:
        raise DMCCacheError("a DMC cache cannot be cropped (merged slots cannot be un-merged); regenerate instead")

    # ---- accounting ----------------------------------------------------------------------------------
    def reserved_bytes(self) -> int:
        """Bytes of the pools, handed out or not, plus the fp32 running state of the open slots."""
        if not self.is_initialized:
            return 0
        state = [self.k_sum, self.v_sum, self.w_sum] + ([self.ring_k, self.ring_v, self.ring_w] if self.window else [])
        return self.pool_bytes() + sum(t.numel() * t.element_size() for t in state)


class DMCCache(Cache):
    """Compressed KV cache for ``dmc_llama`` models; ``generate()`` creates one automatically.

    ``num_slots(layer_idx)`` -> (B, H_kv) live slots; ``allocated_bytes()`` -> bytes of slot blocks in use.
    """

    def __init__(self, config, block_size: int | None = None):
        H_kv = config.num_key_value_heads
        D = head_dim(config)
        block_size = block_size or getattr(config, "dmc_block_size", 16)
        window = getattr(config, "dmc_window", None) or None
        layers = [DMCLayer(H_kv, D, block_size, window) for _ in range(config.num_hidden_layers)]
        super().__init__(layers=layers)

    def layer(self, layer_idx: int) -> DMCLayer:
        return self.layers[layer_idx]

    def num_slots(self, layer_idx: int) -> torch.Tensor:
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            raise DMCCacheError(f"layer {layer_idx} of the DMC cache is empty: run a forward pass first")
        return layer.lens.clone()

    def allocated_bytes(self) -> int:
        return sum(layer.allocated_bytes() for layer in self.layers)

    def reserved_bytes(self) -> int:
        return sum(layer.reserved_bytes() for layer in self.layers)

    def batch_repeat_interleave(self, repeats: int):
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor):
        for layer in self.layers:
            layer.batch_select_indices(indices)
