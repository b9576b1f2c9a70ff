"""``EvictionLayer``: the cache storage of methods that keep or drop whole tokens (DMS, the training-free policies).

Unlike a DMC slot, which holds a merged state, slot s of a (sequence, KV head) pair holds one token's rotated key
and value and that token's position among its sequence's real tokens (``pos_pool``, block for block beside the
keys); ``seen`` (B,) counts each sequence's real tokens. A token leaves by freeing its slot; what fills the hole is
the method's: the DMS cache hands it to the token arriving as the evicted one leaves, the policies move the pair's
last slot into it.
"""

from __future__ import annotations

import torch

from .slot_cache import SlotCacheLayer


class EvictionLayer(SlotCacheLayer):
    slot_pools = ("k_pool", "v_pool", "pos_pool")
    row_state = ("seen",)

    def _init_state(self, batch: int, dtype, device) -> None:
        self.init_pool(batch, dtype, device)
        self.pos_pool = torch.zeros(0, self.block_size, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)  # real tokens per sequence
        self.is_initialized = True

    def place(self, b, h, slot, keys, values, positions) -> tuple[torch.Tensor, torch.Tensor]:
        """Pairs (b, h) (N,) store a token at ``slot``: its key, value (N, D) and position (N,). -> (block, offset)
        of each slot, for the caller's own per-slot pools."""
        self.write(b, h, slot, keys, values)
        blk, off = self.locate(b, h, slot)
        self.pos_pool[blk, off] = positions
        return blk, off

    def allocate_up_to(self, lens: torch.Tensor) -> None:
        """Blocks so that pair (b, h) can hold ``lens[b, h]`` slots."""
        have, need = -(-self.lens // self.block_size), -(-lens // self.block_size)
        for col in range(int(have.min()) if have.numel() else 0, int(need.max()) if need.numel() else 0):
            want = (have <= col) & (col < need)
            self.allocate(want, torch.full_like(have, col))

    def slot_table(self) -> tuple[int, torch.Tensor]:
        """S, the most slots any pair holds (at least 1), and the (B, H_kv, blocks) block table covering them (an
        unallocated entry reads block 0)."""
        S = max(1, int(self.lens.max()))
        return S, self.block_table[..., : -(-S // self.block_size)].clamp(min=0)

    def slot_view(self, pool: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, S, *extra) of a per-slot pool (blocks, block_size, *extra), S the most slots any pair holds (at
        least 1); dead slots hold whatever their place holds (finite), for a reader that masks them anyway."""
        S, table = self.slot_table()
        return pool[table].flatten(2, 3)[:, :, :S]

    def live_slots(self, S: int) -> torch.Tensor:
        """(B, H_kv, S) which of the first S slots of each pair hold a token."""
        return torch.arange(S, device=self.device) < self.lens[..., None]

    def pair_view(self, pool: torch.Tensor, fill) -> torch.Tensor:
        """``slot_view`` with the dead slots holding ``fill``."""
        view = self.slot_view(pool)
        live = self.live_slots(view.shape[2])
        live = live.view(*live.shape, *[1] * (pool.dim() - 2))
        return torch.where(live, view, torch.as_tensor(fill, dtype=pool.dtype, device=pool.device))

    def positions(self, b: int, h: int) -> list[int]:
        """The token positions pair (b, h) holds, sorted (for tests and inspection)."""
        return sorted(self.pair_view(self.pos_pool, -1)[b, h][: int(self.lens[b, h])].tolist())
