"""``PagedSlots``: per (sequence, KV head) lists of key/value slots in one paged pool per layer.

The storage that the DMC cache, every baseline cache policy and the Triton cache update share, so that their
bytes are counted the same way. The public API, all of it tested directly (tests/test_paged_slots.py):

    init_pool(batch, dtype, device)   empty pool and block table for ``batch`` sequences
    allocate(want, block_col)         one block for each pair where ``want`` (B, H_kv), at table column block_col
    allocate_runs(n_blocks)           ``n_blocks[b, h]`` blocks for each pair, at columns 0.. (an empty table)
    release(b, h, col)                blocks back to the free list (reused before the pool grows)
    locate(b, h, slot) -> (block, offset)   where slot ``slot`` of pair (b, h) lives
    write(b, h, slot, keys, values)   store keys/values (N, D) at those slots
    select_sequences(index)           keep/reorder/repeat sequences (beam search); compacts the pool
    add_sequences(n)                  n more (empty) sequences
    insert_sequence(b, other, ob)     copy sequence ``ob`` of another store into the empty sequence b
    release_sequence(b)               free every block of sequence b and empty it (continuous batching)
    allocated_bytes(), pool_bytes()   blocks handed out, and the pool as reserved
    key_values(b, h, slot)            the keys/values stored there, decoded when the pool holds codes

State: ``k_pool``, ``v_pool`` (blocks, block_size, D); ``block_table[b, h, j]`` the block holding slots
``j * block_size ..`` of pair (b, h) (-1: none); ``lens[b, h]`` its number of live slots. Its inverse,
``owners()``: per block the flat pair b * H_kv + h holding it (-1: none) and its table column, kept up to
date by every method that changes the table, so that decode attention does not rebuild it every step. A subclass names
further per-slot pools (``slot_pools``, grown, copied and compacted with the keys) and per-sequence state
(``row_state``, tensors whose first dimension is the sequence). The pool grows by whole zero-filled blocks.

With ``kv_bits`` 8 or 4 the pools hold group-wise integer codes instead (``ops/kv_quant.py``): ``k_pool`` and
``v_pool`` are uint8 (blocks, block_size, D * bits / 8), beside them ``k_scale``, ``k_min``, ``v_scale``,
``v_min`` (blocks, block_size, D / kv_group) in fp16 (``kv_group`` None: the width's default); ``write`` codes what it stores, and every byte count
includes the scales.
"""

from __future__ import annotations

import torch

from .ops.kv_quant import CodedPool, check_bits, code_width, dequantize, quantize, resolve_group

SCALE_POOLS = ("k_scale", "k_min", "v_scale", "v_min")  # beside the codes when kv_bits < 16
SCALE_DTYPE = torch.float16


def slot_bytes(head_dim: int, dtype: torch.dtype, kv_bits: int = 16, kv_group: int | None = None) -> int:
    """Bytes of one slot's key and value: ``dtype`` elements, or codes plus each group's scale and minimum
    (``kv_group`` None: the width's default group)."""
    if kv_bits == 16:
        return 2 * head_dim * torch.empty((), dtype=dtype).element_size()
    groups = head_dim // resolve_group(kv_bits, kv_group, head_dim)
    scales = 2 * groups * torch.empty((), dtype=SCALE_DTYPE).element_size()
    return 2 * (code_width(head_dim, kv_bits) + scales)


class PagedSlots:
    slot_pools: tuple[str, ...] = ("k_pool", "v_pool")  # (blocks, block_size, ...) tensors, block for block
    row_state: tuple[str, ...] = ()  # (B, ...) per-sequence tensors beside the table

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int, kv_bits: int = 16,
                 kv_group: int | None = None):
        self.num_kv_heads, self.head_dim, self.block_size = num_kv_heads, head_dim, block_size
        self.kv_bits = check_bits(kv_bits)
        # None: the width's default; raises for a group that does not divide the head dim
        self.kv_group = resolve_group(kv_bits, kv_group, head_dim) if self.quantized else head_dim

    @property
    def quantized(self) -> bool:
        return self.kv_bits < 16

    def pools(self) -> tuple[str, ...]:
        """Every per-slot pool: the subclass's, plus the code scales of a quantised store."""
        return self.slot_pools + (SCALE_POOLS if self.quantized else ())

    def init_pool(self, batch: int, dtype, device) -> None:
        H, D = self.num_kv_heads, self.head_dim
        self.dtype, self.device = dtype, device
        if self.quantized:
            self.k_pool = torch.empty(0, self.block_size, code_width(D, self.kv_bits), dtype=torch.uint8, device=device)
            for name in SCALE_POOLS:
                groups = D // self.kv_group
                setattr(self, name, torch.empty(0, self.block_size, groups, dtype=SCALE_DTYPE, device=device))
        else:
            self.k_pool = torch.empty(0, self.block_size, D, dtype=dtype, device=device)
        self.v_pool = torch.empty_like(self.k_pool)
        self.used_blocks = 0  # high-water mark of the pool
        self.free_blocks = torch.empty(0, dtype=torch.long, device=device)  # released, below the mark
        self.block_table = torch.full((batch, H, 0), -1, dtype=torch.long, device=device)
        self.lens = torch.zeros(batch, H, dtype=torch.long, device=device)
        self.block_pair = torch.empty(0, dtype=torch.long, device=device)  # the table's inverse, block by block
        self.block_col = torch.empty(0, dtype=torch.long, device=device)

    def owners(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(pair, column) (used blocks,): which flat pair b * H_kv + h holds each block below the high-water
        mark, at which table column (pair -1: a free block)."""
        return self.block_pair[: self.used_blocks], self.block_col[: self.used_blocks]

    def _own(self, ids, b, h, col) -> None:
        self.block_pair[ids] = b * self.num_kv_heads + h
        self.block_col[ids] = col

    def _rebuild_owners(self) -> None:
        held = self.block_table >= 0
        self.block_pair = torch.full((self.k_pool.shape[0],), -1, dtype=torch.long, device=self.device)
        self.block_col = torch.zeros_like(self.block_pair)
        b, h, col = held.nonzero(as_tuple=True)
        self._own(self.block_table[held], b, h, col)

    def reserve(self, extra: int) -> None:
        """Room for ``extra`` blocks above the high-water mark (the pool grows by at least a quarter)."""
        need = self.used_blocks + extra
        if need > self.k_pool.shape[0]:
            grow = max(need, int(self.k_pool.shape[0] * 1.25) + 1) - self.k_pool.shape[0]
            for name in self.pools():  # zeros, not garbage: the paged attention multiplies dead slots by 0
                pool = getattr(self, name)
                setattr(self, name, torch.cat([pool, pool.new_zeros(grow, *pool.shape[1:])]))
            self.block_pair = torch.cat([self.block_pair, self.block_pair.new_full((grow,), -1)])
            self.block_col = torch.cat([self.block_col, self.block_col.new_zeros(grow)])

    def _grow_table(self, width: int) -> None:
        if width > self.block_table.shape[-1]:
            pad = self.block_table.new_full((*self.block_table.shape[:2], width - self.block_table.shape[-1]), -1)
            self.block_table = torch.cat([self.block_table, pad], dim=-1)

    def _take_blocks(self, n: int) -> torch.Tensor:
        """``n`` block ids: released ones first, then fresh ones above the high-water mark."""
        reuse = min(n, self.free_blocks.numel())
        fresh = n - reuse
        self.reserve(fresh)
        ids = torch.cat([self.free_blocks[:reuse], self.used_blocks + torch.arange(fresh, device=self.device)])
        self.free_blocks = self.free_blocks[reuse:]
        self.used_blocks += fresh
        return ids

    def allocate(self, want: torch.Tensor, block_col: torch.Tensor) -> None:
        """Give a block to every pair where ``want`` (B, H_kv), at table column ``block_col`` (B, H_kv)."""
        n = int(want.sum())
        if n == 0:
            return
        ids = self._take_blocks(n)
        self._grow_table(int(block_col[want].max()) + 1)
        b, h = want.nonzero(as_tuple=True)
        self.block_table[b, h, block_col[b, h]] = ids
        self._own(ids, b, h, block_col[b, h])

    def allocate_runs(self, n_blocks: torch.Tensor) -> None:
        """Give pair (b, h) ``n_blocks[b, h]`` blocks at table columns 0.. (an empty table)."""
        total, width = int(n_blocks.sum()), int(n_blocks.max()) if n_blocks.numel() else 0
        self._grow_table(width)
        if total == 0:
            return
        ids = self._take_blocks(total)
        first = n_blocks.flatten().cumsum(0).view_as(n_blocks) - n_blocks  # (B, H_kv): the pair's first id in ids
        col = torch.arange(width, device=self.device)
        at = (first[..., None] + col).clamp(max=total - 1)
        self.block_table[..., :width] = torch.where(col < n_blocks[..., None], ids[at], -1)
        self._rebuild_owners()

    def release(self, b: torch.Tensor, h: torch.Tensor, col: torch.Tensor) -> None:
        """Return the blocks at table column ``col`` of pairs (b, h) (N,) to the free list."""
        ids = self.block_table[b, h, col]
        self.block_table[b, h, col] = -1
        self.free_blocks = torch.cat([self.free_blocks, ids[ids >= 0]])
        self.block_pair[ids[ids >= 0]] = -1

    def locate(self, b: torch.Tensor, h: torch.Tensor, slot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) (N,) of slot ``slot`` of pairs (b, h) (N,); the slot's block must be allocated: an
        unallocated one (-1) would index the pool's last block, so it raises instead."""
        block = self.block_table[b, h, slot // self.block_size]
        if bool((block < 0).any()):
            i = int((block < 0).nonzero()[0, 0])
            raise RuntimeError(f"paged slots: pair ({int(b[i])}, {int(h[i])}) has no block for slot {int(slot[i])}; "
                               "allocate before writing or reading it")
        return block, slot % self.block_size

    def write(self, b, h, slot, keys, values) -> None:
        """keys, values (N, D) into slot ``slot`` of pairs (b, h) (N,), cast to the pool's dtype."""
        block, offset = self.locate(b, h, slot)
        if not self.quantized:
            self.k_pool[block, offset] = keys.to(self.dtype)
            self.v_pool[block, offset] = values.to(self.dtype)
            return
        for x, names in ((keys, ("k_pool", "k_scale", "k_min")), (values, ("v_pool", "v_scale", "v_min"))):
            for name, part in zip(names, quantize(x, self.kv_bits, self.kv_group, SCALE_DTYPE)):
                getattr(self, name)[block, offset] = part

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) as a quantised store gives it back after ``write``: coded, then decoded (x itself if the
        store keeps the model's dtype)."""
        if not self.quantized:
            return x
        return dequantize(*quantize(x, self.kv_bits, self.kv_group, SCALE_DTYPE), self.kv_bits, x.dtype)

    def key_values(self, b, h, slot) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (N, D) stored at slot ``slot`` of pairs (b, h), decoded to the store's dtype."""
        block, offset = self.locate(b, h, slot)
        if not self.quantized:
            return self.k_pool[block, offset], self.v_pool[block, offset]
        return tuple(pool.decode((block, offset), self.dtype) for pool in self.coded_pools())

    def coded_pools(self) -> tuple[CodedPool, CodedPool]:
        """The key and value pools of a quantised store, each with its scales and minima."""
        return tuple(CodedPool(getattr(self, f"{x}_pool"), getattr(self, f"{x}_scale"), getattr(self, f"{x}_min"),
                               self.kv_bits) for x in "kv")

    def select_sequences(self, index: torch.Tensor) -> None:
        """Keep/reorder/repeat sequences; blocks are copied, never shared, and the pool is compacted."""
        table = self.block_table[index]
        live = table >= 0
        new_ids = live.flatten().long().cumsum(0).view_as(table) - 1
        for name in self.pools():
            setattr(self, name, getattr(self, name)[table[live]])
        self.used_blocks = int(live.sum())
        self.free_blocks = self.free_blocks[:0]
        self.block_table = torch.where(live, new_ids, -1)
        self.lens = self.lens[index]
        for name in self.row_state:
            setattr(self, name, getattr(self, name)[index])
        self._rebuild_owners()

    def keep_sequences(self, index: torch.Tensor) -> None:
        """Keep the sequences ``index`` (in that order) and drop the rest, which must hold no blocks; unlike
        ``select_sequences`` no block moves and the pools and free list stay as they are (a server dropping idle
        rows after a burst: nothing is copied but the table's rows)."""
        dropped = torch.ones(self.block_table.shape[0], dtype=torch.bool, device=self.device)
        dropped[index] = False
        if bool((self.block_table[dropped] >= 0).any()):
            raise ValueError("keep_sequences: a dropped sequence still holds blocks; release_sequence it first")
        self.block_table = self.block_table[index]
        self.lens = self.lens[index]
        for name in self.row_state:
            setattr(self, name, getattr(self, name)[index])
        self._rebuild_owners()

    def add_sequences(self, n: int) -> None:
        """Append ``n`` empty sequences (no blocks, zeroed state) after the existing ones."""
        self.block_table = torch.cat([self.block_table, self.block_table.new_full((n, *self.block_table.shape[1:]), -1)])
        self.lens = torch.cat([self.lens, self.lens.new_zeros(n, *self.lens.shape[1:])])
        for name in self.row_state:
            state = getattr(self, name)
            setattr(self, name, torch.cat([state, state.new_zeros(n, *state.shape[1:])]))

    def insert_sequence(self, b: int, other: PagedSlots, ob: int = 0) -> None:
        """Copy sequence ``ob`` of ``other`` (same heads, head dim, block size and pools) into the empty
        sequence ``b``: its blocks into fresh blocks of this pool, its table row, lengths and state."""
        if bool((self.block_table[b] >= 0).any()):
            raise ValueError(f"sequence {b} still holds blocks: release_sequence({b}) first")
        src = other.block_table[ob]  # (H_kv, cols)
        held = src >= 0
        ids = self._take_blocks(int(held.sum()))
        self._grow_table(src.shape[-1])
        row = self.block_table[b]
        row[:, : src.shape[-1]][held] = ids
        h, col = held.nonzero(as_tuple=True)
        self._own(ids, b, h, col)
        for name in self.pools():
            getattr(self, name)[ids] = getattr(other, name)[src[held]]
        self.lens[b] = other.lens[ob]
        for name in self.row_state:
            getattr(self, name)[b] = getattr(other, name)[ob]

    def release_sequence(self, b: int) -> None:
        """Free every block of sequence ``b`` (they are reused before the pool grows) and empty it; its row
        stays, ready for ``insert_sequence``."""
        h, col = (self.block_table[b] >= 0).nonzero(as_tuple=True)
        self.release(torch.full_like(h, b), h, col)
        self.lens[b] = 0
        for name in self.row_state:
            getattr(self, name)[b] = 0

    def allocated_bytes(self) -> int:
        """Bytes of the slot blocks handed out (keys and values)."""
        if not getattr(self, "is_initialized", False):
            return 0
        return (self.used_blocks - self.free_blocks.numel()) * self.block_bytes()

    def block_bytes(self) -> int:
        """Bytes of one block of keys and values (codes plus their scales and minima when quantised)."""
        return self.block_size * self.slot_bytes()

    def slot_bytes(self) -> int:
        """Bytes one slot's key and value take in this store."""
        return slot_bytes(self.head_dim, self.dtype, self.kv_bits, self.kv_group)

    def pool_bytes(self) -> int:
        """Bytes of the pools as reserved (blocks handed out or not)."""
        return self.k_pool.shape[0] * self.block_bytes() if getattr(self, "is_initialized", False) else 0
