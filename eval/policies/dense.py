"""The same policies on dense per-pair slot buffers: the fast layout for quality evaluation.

``PolicyLayer`` keeps slots in the paged pool DMC uses, so bytes are counted alike; every step then pays for
block-table bookkeeping and a block-wise attention, a few milliseconds per layer and token on a CPU, which
made a policy's perplexity run cost twice the model's own forward. Here each (sequence, KV head) pair owns
row ``[b, h, :capacity]`` of one tensor per layer: appending is one scatter, evicting moves the pair's last
slot into the freed one with a gather and a scatter, and attention is one batched matmul over the longest
pair's slots. Same slots, same order, same decisions as the paged layer (tests/test_policies.py checks
logits and kept positions against it); only memory is not comparable, so it reports the bytes the paged
layout would hand out for the same slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmc.ops.decode_attention import decode_attention_padded
from dmc.paged_slots import slot_bytes

from .paged import PolicyLayer, left_padded


class DensePolicyLayer(PolicyLayer):
    """A ``PolicyLayer`` whose ``*_pool`` tensors are (B, H_kv, capacity, *extra), indexed by slot."""

    def _init_state(self, batch: int, dtype, device) -> None:
        H, D = self.num_kv_heads, self.head_dim
        self.dtype, self.device = dtype, device
        self.k_pool = torch.zeros(batch, H, 0, D, dtype=dtype, device=device)
        self.v_pool = torch.zeros_like(self.k_pool)
        self.pos_pool = torch.zeros(batch, H, 0, dtype=torch.long, device=device)
        self.score_pool = torch.zeros(batch, H, 0, dtype=torch.float32, device=device)
        self.hist_pool = torch.zeros(batch, H, 0, self.policy.history, dtype=torch.float32, device=device)
        self.lens = torch.zeros(batch, H, dtype=torch.long, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.steps = 0
        self.is_initialized = True

    def _pools(self):
        pools = [self.k_pool, self.v_pool, self.pos_pool, self.score_pool]
        return pools + [self.hist_pool] if self.policy.history else pools

    def _grow(self, need: int) -> None:
        cap = self.k_pool.shape[2]
        if need <= cap:
            return
        grow = max(need, 2 * cap, self.block_size) - cap  # doubling: a handful of copies per sequence
        for name in ("k_pool", "v_pool", "pos_pool", "score_pool", "hist_pool"):
            pool = getattr(self, name)
            setattr(self, name, torch.cat([pool, pool.new_zeros(*pool.shape[:2], grow, *pool.shape[3:])], 2))

    @staticmethod
    def _at(pool: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Index (B, H_kv, 1, *extra) for slot ``slot`` (B, H_kv) of every pair, for gather/scatter on dim 2."""
        return slot.view(*slot.shape, 1, *[1] * (pool.dim() - 3)).expand(*slot.shape, 1, *pool.shape[3:])

    def slot_view(self, pool: torch.Tensor) -> torch.Tensor:
        return pool[:, :, : max(1, int(self.lens.max()))]  # append and prefill grow the pools first: capacity >= S

    def pair_view(self, pool: torch.Tensor, fill) -> torch.Tensor:
        view = self.slot_view(pool)
        S = view.shape[2]
        live = torch.arange(S, device=pool.device) < self.lens[..., None]
        live = live.view(*live.shape, *[1] * (pool.dim() - 3))
        return torch.where(live, view, torch.as_tensor(fill, dtype=pool.dtype, device=pool.device))

    def append(self, keys, values, valid) -> None:
        B, H, _ = keys.shape
        if not self.is_initialized:
            self._init_state(B, keys.dtype, keys.device)
        self._grow(int(self.lens.max()) + 1)
        slot = self.lens  # a padding row writes into its first dead slot and does not count it: harmless
        # a quantised store keeps what its codes would give back (the same numbers as the paged layer's codes)
        new = [self.round_trip(keys).to(self.dtype), self.round_trip(values).to(self.dtype), self.seen[:, None].expand(B, H),
               torch.zeros(B, H, dtype=torch.float32, device=keys.device)]
        if self.policy.history:
            new.append(torch.full((B, H, self.policy.history), -1.0, device=keys.device))  # not yet observed
        for pool, value in zip(self._pools(), new):
            pool.scatter_(2, self._at(pool, slot), value.unsqueeze(2))
        self.lens = self.lens + valid[:, None].long()
        self.seen = self.seen + valid.long()
        if self.quantized:
            self.fresh = (keys, values, valid[:, None].expand(B, H))

    def evict(self, over: torch.Tensor, slot: torch.Tensor) -> None:
        """As the paged layer: the pair's last slot moves into the evicted one (pairs not over move their last
        slot onto itself)."""
        last = (self.lens - 1).clamp(min=0)
        dst = torch.where(over, slot, last)
        for pool in self._pools():
            pool.scatter_(2, self._at(pool, dst), pool.gather(2, self._at(pool, last)))
        self.lens = self.lens - over.long()

    def branch(self, index: torch.Tensor, policy) -> None:
        """After a whole prompt's prefill (``PolicyCache.branch``): row i becomes row ``index[i]`` (rows repeated or
        dropped, every per-row state alike), under ``policy``, compressed to its budget."""
        if self.quantized:
            raise ValueError("branching keeps full-precision slots only")
        for name in ("k_pool", "v_pool", "pos_pool", "score_pool", "hist_pool", "lens", "seen"):
            setattr(self, name, getattr(self, name).index_select(0, index))
        self.policy = policy
        self.end_prefill()

    def stream(self, q, k, v, valid, scale, evict: bool = True) -> torch.Tensor:
        """A fresh, left-padded prompt under a policy that decides by positions alone (``Policy.replay``) attends in
        one pass over exactly what each token would see streaming, and leaves the same slots in the same order;
        anything else streams token by token."""
        B, H, T, D = q.shape
        fresh = not self.is_initialized or not bool(self.seen.any())
        if not (evict and fresh and T > 1 and not self.quantized and left_padded(valid)):
            return super().stream(q, k, v, valid, scale, evict)
        n = valid.sum(-1)
        allowed = self.policy.budget.slots(n.new_zeros(B)[:, None] + torch.arange(T + 1, device=n.device)[None])
        keys = [(int(m), tuple(allowed[b, : int(m) + 1].tolist())) for b, m in enumerate(n)]  # rows alike share one
        plays = {key: self.policy.replay(key[0], list(key[1])) for key in dict.fromkeys(keys)}
        if any(play is None for play in plays.values()):
            return super().stream(q, k, v, valid, scale, evict)
        if not self.is_initialized:
            self._init_state(B, k.dtype, k.device)
        mask = torch.eye(T, dtype=torch.bool, device=q.device).repeat(B, 1, 1)  # padding queries: themselves
        kept = []
        for b, key in enumerate(keys):
            seen, slots = plays[key]
            pad = T - key[0]
            mask[b, pad:, pad:] = seen.to(q.device)
            kept.append((pad, slots))
        g = H // k.shape[1]
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                             attn_mask=mask[:, None], scale=scale)
        self._grow(max(1, max(len(slots) for _, slots in kept)))
        for b, (pad, slots) in enumerate(kept):
            index = torch.tensor([pad + p for p in slots], dtype=torch.long, device=q.device)
            S = len(slots)
            self.k_pool[b, :, :S] = k[b, :, index].to(self.dtype)
            self.v_pool[b, :, :S] = v[b, :, index].to(self.dtype)
            self.pos_pool[b, :, :S] = torch.tensor(slots, dtype=torch.long, device=q.device)
            self.score_pool[b, :, :S] = 0
            self.hist_pool[b, :, :S] = -1
            self.lens[b] = S
        self.seen = self.seen + n
        self.steps += T  # every step of the stream is observed once
        return out.transpose(1, 2)

    def drop_in_order(self, drop: torch.Tensor, doomed: torch.Tensor) -> None:
        """As the paged layer's one-at-a-time evictions (each moving the pair's last slot into the freed one), played
        on the slots' positions alone, then every pool gathered once into the order they leave: a prompt compressed
        by hundreds of slots costs hundreds of small steps on one tensor, not on five pools."""
        S = max(1, int(self.lens.max()))
        pos = self.pair_view(self.pos_pool, -1).clone()  # (B, H_kv, S); -1: dead
        where = torch.arange(S, device=pos.device).expand_as(pos).clone()  # the slot now at each place
        lens = self.lens.clone()
        for k in range(int(drop.max())):
            go = drop > k
            slot = (pos == doomed[..., k : k + 1]).long().argmax(-1)
            last = (lens - 1).clamp(min=0)
            dst = torch.where(go, slot, last)[..., None]
            last = last[..., None]
            for t in (pos, where):
                t.scatter_(-1, dst, t.gather(-1, last))
            pos.scatter_(-1, last, torch.where(go[..., None], -1, pos.gather(-1, last)))  # the freed place is dead
            lens = lens - go.long()
        for name in ("k_pool", "v_pool", "pos_pool", "score_pool", "hist_pool"):
            pool = getattr(self, name)
            index = where.view(*where.shape, *[1] * (pool.dim() - 3)).expand(*where.shape, *pool.shape[3:])
            pool[:, :, :S] = pool[:, :, :S].gather(2, index)
        self.lens = lens

    def attend(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, H, D): (output (B, H, D), attention per slot (B, H_kv, capacity), group mean, 0 where dead)."""
        S = max(1, int(self.lens.max()))
        keys, values = self.with_fresh(self.k_pool[:, :, :S], self.v_pool[:, :, :S])
        out, p = decode_attention_padded(q, keys, values, self.lens, scale)
        probs = p.new_zeros(*self.lens.shape, self.k_pool.shape[2])
        probs[..., :S] = p
        return out, probs

    prefill_chunk = 128  # prompt queries per attention call: bounds the (queries x slots) scores held at once

    def prefill_prompt(self, q, k, v, valid, scale) -> torch.Tensor:
        """The paged layer's token-by-token prefill in one causal attention over the prompt (queries in chunks
        of ``prefill_chunk``): slot s of a row is its s-th real token, and step t's observation is query t's attention,
        with the slots not yet appended at step t marked unobserved (-1) in the history, as appending does."""
        if self.quantized:  # each token exact at its own step, coded after: the reference's one at a time
            return self.stream(q, k, v, valid, scale, evict=False)
        B, H, T, D = q.shape
        H_kv = k.shape[1]
        if not self.is_initialized:
            self._init_state(B, k.dtype, k.device)
        n = valid.sum(-1)  # (B,) real tokens; padding is on the left, so row b's slot s is token pad[b] + s
        pad, S = T - n, max(1, int(n.max()))
        self._grow(S)
        token = (pad[:, None] + torch.arange(S, device=q.device)).clamp(max=T - 1)  # (B, S); dead slots: anything
        at = token[:, None, :, None].expand(B, H_kv, S, D)
        keys, values = k.gather(2, at).to(self.dtype), v.gather(2, at).to(self.dtype)
        self.k_pool[:, :, :S], self.v_pool[:, :, :S] = keys, values
        self.pos_pool[:, :, :S] = torch.arange(S, device=q.device)
        self.score_pool.zero_()
        self.hist_pool.fill_(-1)
        self.lens, self.seen = n[:, None].expand(B, H_kv).clone(), n.clone()

        work, g = torch.promote_types(q.dtype, torch.float32), H // H_kv
        keep_history = T - self.policy.history  # older steps' history entries are overwritten within the prompt
        outs, chunk = [], self.prefill_chunk
        for t0 in range(0, T, chunk):
            c = min(chunk, T - t0)
            t = torch.arange(t0, t0 + c, device=q.device)
            width = max(1, min(S, t0 + c - int(pad.min())))  # no query of this chunk sees a later slot
            slot = torch.arange(width, device=q.device)
            seen = (slot <= t[None, :, None] - pad[:, None, None]) & (slot < n[:, None, None])  # (B, c, width)
            qg = q[:, :, t0 : t0 + c].reshape(B, H_kv, g * c, D)  # a group's g heads as g * c queries of one KV head
            scores = (qg @ keys[:, :, :width].transpose(-1, -2)).to(work).view(B, H_kv, g, c, width) * scale
            p = scores.masked_fill(~seen[:, None, None], float("-inf")).softmax(-1)
            p = torch.where(seen.any(-1)[:, None, None, :, None], p, 0)  # a padding step attends to nothing
            out = p.to(q.dtype).view(B, H_kv, g * c, width) @ values[:, :, :width]
            outs.append(out.view(B, H, c, D))
            probs = torch.zeros(B, H_kv, c, self.k_pool.shape[2], dtype=work, device=q.device)
            probs[..., :width] = p.mean(2)
            self.policy.observe_many(self, probs)
            for i in range(max(0, keep_history - t0), c):  # the history ring, as one step at a time leaves it
                observed = torch.zeros_like(probs[:, :, i], dtype=torch.bool)
                observed[..., :width] = seen[:, None, i]
                self.hist_pool[..., (self.steps + i) % self.policy.history] = torch.where(observed, probs[:, :, i], -1)
            self.steps += c
        return torch.cat(outs, 2).transpose(1, 2)

    def allocated_bytes(self) -> int:
        """What the paged layout hands out for the same slots (whole blocks), so reports stay comparable."""
        if not self.is_initialized:
            return 0
        blocks = int((-(-self.lens // self.block_size)).sum())
        return blocks * self.block_size * slot_bytes(self.head_dim, self.dtype, self.kv_bits, self.kv_group)

    def reserved_bytes(self) -> int:
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size() for t in (self.k_pool, self.v_pool, self.pos_pool, self.score_pool,
                                                           self.hist_pool))
