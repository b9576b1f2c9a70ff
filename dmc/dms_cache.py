"""``DMSCache``: per (sequence, layer, KV head), the last ``window`` tokens plus the older tokens kept.

Slots live in the same paged pool as DMC's and the policies' (``paged_slots.py``). A token that the next token
flags stays ``window`` more tokens and then leaves; the token arriving at that moment takes its slot in place
(no block grows), so a pair holds exactly its unflagged tokens plus its last ``window + 1`` tokens. Beside the
pool: each slot's token position (``pos_pool``), and per pair a ring of the last ``window + 1`` tokens' slots and
flags, the only tokens whose fate is still open (every older token is final: kept for good).
"""

from __future__ import annotations

import torch

from .eviction_slots import EvictionLayer
from .metrics import head_dim
from .slot_cache import DMCCacheError, SlotCache


class DMSLayer(EvictionLayer):
    update_hint = ("DMSCache is filled by DMS attention layers; it cannot take plain key/value updates. Use it with "
                   "a dms_llama model, or a DynamicCache with a vanilla Llama.")
    row_state = ("ring_slot", "ring_flag", "seen")

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int, window: int, kv_bits: int = 16,
                 kv_group: int | None = None):
        super().__init__(num_kv_heads, head_dim, block_size, kv_bits, kv_group)
        self.window = window

    def _init_state(self, batch: int, dtype, device) -> None:
        super()._init_state(batch, dtype, device)
        H, R = self.num_kv_heads, self.window + 1
        # ring index p % R holds token p's slot and flag while p is among the last R tokens
        self.ring_slot = torch.zeros(batch, H, R, dtype=torch.long, device=device)
        self.ring_flag = torch.zeros(batch, H, R, dtype=torch.bool, device=device)

    def chunk_positions(self, valid: torch.Tensor) -> torch.Tensor:
        """(B, T) the positions a chunk's tokens take (valid (B, T), left padding; padding gets earlier ones)."""
        T = valid.shape[1]
        seen = self.seen if self.is_initialized else torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
        return seen[:, None] + torch.arange(T, device=valid.device) - (T - valid.sum(-1))[:, None]

    def _ring(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The last R tokens in position order: (pos (B, R), held (B, R), slot, flag (B, H_kv, R))."""
        B, H, R = self.ring_slot.shape
        pos = self.seen[:, None] - R + torch.arange(R, device=self.device)
        at = (pos % R)[:, None, :].expand(B, H, R)
        return pos, pos >= 0, self.ring_slot.gather(-1, at), self.ring_flag.gather(-1, at)

    # ---- the way in: flag the predecessor, then add the tokens -------------------------------------------
    def flag_previous(self, decide: torch.Tensor, valid: torch.Tensor) -> None:
        """Each sequence's first real token of a chunk decides about the last token in the cache.
        decide (B, H_kv, T) bool, token t's own decision; valid (B, T), left padding."""
        B, H, T = decide.shape
        if not self.is_initialized:  # an empty cache: nothing to flag
            return
        n = valid.sum(-1)
        first = (T - n).clamp(max=T - 1)
        d_first = decide.gather(-1, first[:, None, None].expand(B, H, 1))[..., 0] & ((n > 0) & (self.seen > 0))[:, None]
        last = ((self.seen - 1) % (self.window + 1))[:, None, None].expand(B, H, 1)
        self.ring_flag.scatter_(-1, last, self.ring_flag.gather(-1, last) | d_first[..., None])

    def add(self, keys: torch.Tensor, values: torch.Tensor, decide: torch.Tensor, valid: torch.Tensor) -> None:
        """Add a chunk's tokens (after ``flag_previous``): keys (rotated), values (B, H_kv, T, D); decide (B, H_kv, T)
        token t's decision about its predecessor; valid (B, T), left padding. Tokens flagged and now more than
        ``window`` behind the chunk's last token leave; the chunk's kept tokens fill their slots, then append."""
        B, H, T, D = keys.shape
        R = self.window + 1
        if not self.is_initialized:
            self._init_state(B, keys.dtype, keys.device)
        if T == 1:  # decoding: the same rule, without the sort
            return self._add_one(keys[:, :, 0], values[:, :, 0], valid[:, 0])
        n = valid.sum(-1)
        end = self.seen + n - 1  # the last position after the chunk
        ring_pos, ring_held, old_slot, old_flag = self._ring()
        chunk_pos = self.chunk_positions(valid)
        # key t is flagged by token t + 1 of the chunk (the last token's flag is not known yet)
        new_flag = torch.cat([decide[..., 1:], decide.new_zeros(B, H, 1)], -1) & valid[:, None, :]
        horizon = (end - R)[:, None, None]
        gone_old = old_flag & ring_held[:, None, :] & (ring_pos[:, None, :] <= horizon)
        keep_new = valid[:, None, :] & ~(new_flag & (chunk_pos[:, None, :] <= horizon))
        # the chunk's kept tokens take the freed slots (in ring order), then append; at least as many are kept
        # as freed, since the freed ones are among the chunk's first tokens' predecessors within the window
        n_holes, n_keep = gone_old.sum(-1), keep_new.sum(-1)
        holes = torch.where(gone_old, old_slot, torch.iinfo(torch.long).max).sort(-1).values
        rank = keep_new.long().cumsum(-1) - 1
        slot = torch.where(rank < n_holes[..., None], holes.gather(-1, rank.clamp(0, R - 1)),
                           self.lens[..., None] + rank - n_holes[..., None])
        new_lens = self.lens + n_keep - n_holes
        self.allocate_up_to(new_lens)
        b, h, t = keep_new.nonzero(as_tuple=True)
        self.place(b, h, slot[b, h, t], keys[b, h, t], values[b, h, t], chunk_pos[b, t])
        self.lens = new_lens
        # the new ring: every token (old ring or chunk) among the last R positions, at index pos % R
        pos = torch.cat([ring_pos[:, None, :].expand(B, H, R), chunk_pos[:, None, :].expand(B, H, T)], -1)
        into = torch.cat([ring_held[:, None, :].expand(B, H, R), valid[:, None, :].expand(B, H, T)], -1)
        into = into & (pos > horizon)
        at = torch.where(into, pos % R, R)  # R: a scratch column, dropped
        for ring, value in ((self.ring_slot, torch.cat([old_slot, slot], -1)),
                            (self.ring_flag, torch.cat([old_flag, new_flag], -1))):
            wide = torch.cat([ring, ring[..., :1]], -1)
            wide.scatter_(-1, at, value.to(ring.dtype))
            ring.copy_(wide[..., :R])
        self.seen = self.seen + n
        self.seen_tokens += T

    def _add_one(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> None:
        """``add`` of one token per sequence (decoding), in O(1) per pair: only the token ``window + 1`` back can
        leave, and the new token takes its slot if it does. keys, values (B, H_kv, D); valid (B,)."""
        B, H, R = self.ring_slot.shape
        at = (self.seen % R)[:, None, None].expand(B, H, 1)  # the ring entry of token seen - R, and of the new token
        old = self.ring_slot.gather(-1, at)[..., 0]
        live = valid[:, None].expand(B, H)
        reuse = self.ring_flag.gather(-1, at)[..., 0] & live  # entries of positions < 0 were never flagged
        slot = torch.where(reuse, old, self.lens)
        append = live & ~reuse
        self.allocate(append & (slot % self.block_size == 0), slot // self.block_size)
        self.lens = self.lens + append.long()
        b, h = live.nonzero(as_tuple=True)
        self.place(b, h, slot[b, h], keys[b, h], values[b, h], self.seen[b])
        self.ring_slot.scatter_(-1, at, torch.where(live, slot, old)[..., None])
        self.ring_flag.scatter_(-1, at, self.ring_flag.gather(-1, at) & ~live[..., None])
        self.seen = self.seen + valid.long()
        self.seen_tokens += 1

    # ---- reading ---------------------------------------------------------------------------------------
    def held_view(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every pair's slots, padded: (keys, values (B, H_kv, S, D), positions, live, flagged (B, H_kv, S));
        ``flagged``: the ring's flags (a flagged slot leaves once a query is more than ``window`` past it). A quantised
        store gives back its keys and values decoded (only the blocks the pairs hold)."""
        S, table = self.slot_table()
        if self.quantized:
            keys, values = (p.decode(table, self.dtype).flatten(2, 3)[:, :, :S] for p in self.coded_pools())
        else:
            keys, values = self.slot_view(self.k_pool), self.slot_view(self.v_pool)
        pos = self.slot_view(self.pos_pool)
        live = self.live_slots(S)
        _, held, slot, flag = self._ring()
        flagged = torch.zeros(*live.shape[:2], S + 1, dtype=torch.bool, device=self.device)
        flagged.scatter_(-1, torch.where(held[:, None, :] & flag, slot, S), True)
        return keys, values, pos, live, flagged[..., :S]

    def crop(self, tokens_to_remove: int) -> None:
        raise DMCCacheError("a DMS cache cannot be cropped (evicted tokens are gone); regenerate instead")

    def side_state(self) -> tuple[torch.Tensor, ...]:
        """Each slot's position and each pair's ring of open decisions."""
        return self.pos_pool, self.ring_slot, self.ring_flag


class DMSCache(SlotCache):
    """Delayed-eviction KV cache for ``dms_llama`` models; ``generate()`` creates one automatically.

    ``num_slots(layer_idx)`` -> (B, H_kv) held slots (the window included); ``allocated_bytes()`` -> bytes of slot
    blocks in use."""

    def __init__(self, config, block_size: int | None = None):
        H_kv, D = config.num_key_value_heads, head_dim(config)
        block_size = block_size or getattr(config, "dms_block_size", 16)
        window = getattr(config, "dms_window", 512)
        bits, group = getattr(config, "dms_kv_bits", 16), getattr(config, "dms_kv_group", None)
        super().__init__(layers=[DMSLayer(H_kv, D, block_size, window, bits, group)
                                 for _ in range(config.num_hidden_layers)])

    def layer(self, layer_idx: int) -> DMSLayer:
        return self.layers[layer_idx]
