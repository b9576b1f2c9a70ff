"""``PolicyLayer``: a training-free policy's cache layer on the paged storage DMS uses (``dmc/eviction_slots.py``).

Every token, prompt tokens included, is processed the way a deployed model with that policy would: its key/value is
appended to its sequence's slots (RoPE already applied, as usual for eviction methods), it attends over the slots
with the same paged attention as DMC decoding, the policy updates its per-slot scores from that attention, and slots
are evicted (the pair's last slot moves into the hole) until the budget holds.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dmc.eviction_slots import EvictionLayer
from dmc.ops.decode_attention import decode_attention_padded, decode_attention_paged
from dmc.ops.quant_attention import decode_attention_quant_paged
from dmc.ops.quant_prefill import prefill_attention_quant
from dmc.ops.train_attention import MASKED

from .policy import Policy


def left_padded(valid: torch.Tensor) -> bool:
    """A prompt of several tokens whose padding, if any, comes first."""
    return valid.shape[1] > 1 and not bool((valid[:, 1:].long() < valid[:, :-1].long()).any())


class PolicyLayer(EvictionLayer):
    update_hint = "PolicyCache is filled by PolicyLlamaAttention; run apply_policy(model) first"
    # per-slot position, score and attention history live beside the keys, block for block
    slot_pools = ("k_pool", "v_pool", "pos_pool", "score_pool", "hist_pool")

    def __init__(self, num_kv_heads: int, head_dim: int, block_size: int, policy: Policy, question_aware: bool = False,
                 kv_bits: int = 16, kv_group: int | None = None):
        super().__init__(num_kv_heads, head_dim, block_size, kv_bits, kv_group)
        self.policy, self.question_aware = policy, question_aware
        self.compress_after_prefill = True  # question-aware: False while PolicyCache.branch is to do it
        self.prompt_seen: torch.Tensor | None = None  # question-aware: real prompt tokens, set after prefill
        # a quantised store codes each token as it is appended; the step that appended it still attends to it exactly
        # (as DMC's open slot): (keys, values (B, H_kv, D), appended (B, H_kv)) of the last append
        self.fresh: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def _init_state(self, batch: int, dtype, device) -> None:
        super()._init_state(batch, dtype, device)
        self.score_pool = torch.zeros(0, self.block_size, dtype=torch.float32, device=device)
        self.hist_pool = torch.zeros(0, self.block_size, self.policy.history, dtype=torch.float32, device=device)
        self.steps = 0  # attention observations so far (indexes the history ring)

    def observe(self, probs: torch.Tensor) -> None:
        """This step's attention per pool slot: the policy's own scores, then the history ring (policies
        with ``history``)."""
        self.policy.observe(self, probs)
        if self.policy.history:
            self.hist_pool[..., self.steps % self.policy.history] = probs
        self.steps += 1

    def oldest_slot(self) -> torch.Tensor:
        """(B, H_kv) index of each pair's slot with the smallest position (the fallback eviction)."""
        return self.pair_view(self.pos_pool, torch.iinfo(torch.long).max).argmin(-1)

    def append(self, keys, values, valid) -> None:
        """keys, values (B, H_kv, D) rotated; valid (B,) False for left padding. A slot remembers its
        token's index among its sequence's real tokens (``pos_pool``)."""
        B, H, _ = keys.shape
        if not self.is_initialized:
            self._init_state(B, keys.dtype, keys.device)
        live = valid[:, None].expand(B, H)
        slot = self.lens
        self.allocate(live & (slot % self.block_size == 0), slot // self.block_size)
        b, h = live.nonzero(as_tuple=True)
        blk, off = self.place(b, h, slot[b, h], keys[b, h], values[b, h], self.seen[b])
        self.score_pool[blk, off] = 0
        self.hist_pool[blk, off] = -1  # not yet observed
        self.lens = self.lens + live.long()
        self.seen = self.seen + valid.long()
        if self.quantized:
            self.fresh = (keys, values, live)

    def with_fresh(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values (B, H_kv, S, D) read back from a quantised store, with each pair's newest slot replaced by
        its exact key/value where the last append wrote it (the step that appends a token sees it uncoded)."""
        if self.fresh is None:
            return keys, values
        k_new, v_new, live = self.fresh
        b, h = live.nonzero(as_tuple=True)
        slot = self.lens[b, h] - 1
        keys, values = keys.clone(), values.clone()
        keys[b, h, slot], values[b, h, slot] = k_new[b, h].to(keys.dtype), v_new[b, h].to(values.dtype)
        return keys, values

    def evict(self, over: torch.Tensor, slot: torch.Tensor) -> None:
        """Drop slot ``slot[b, h]`` of every pair where ``over``: the pair's last slot moves into its place
        (attention does not depend on slot order), and a block left empty goes back to the free list."""
        b, h = over.nonzero(as_tuple=True)
        if b.numel() == 0:
            return
        last = self.lens[b, h] - 1
        dst, dst_off = self.locate(b, h, slot[b, h])
        src, src_off = self.locate(b, h, last)
        for pool in (getattr(self, name) for name in self.pools()):
            pool[dst, dst_off] = pool[src, src_off]
            pool[src, src_off] = 0  # dead slots stay zero (finite) for the paged attention
        self.lens[b, h] = last
        empty = last % self.block_size == 0
        self.release(b[empty], h[empty], (last // self.block_size)[empty])

    def attend(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """q (B, H, D): (output (B, H, D), this step's attention per pool slot (group mean), None for a policy
        that does not observe)."""
        if self.quantized:
            return self._attend_codes(q, scale)
        if not self.policy.observes:
            return decode_attention_paged(q, self.k_pool, self.v_pool, self.block_table, self.lens, scale,
                                          owned=self.owners()), None
        return decode_attention_paged(q, self.k_pool, self.v_pool, self.block_table, self.lens, scale,
                                      return_slot_probs=True, owned=self.owners())

    def _attend_codes(self, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention over a quantised store: the newest token exact, every other slot from its codes. A policy
        that does not observe takes the paged path over codes (the newest token as its open slot); one that
        observes needs each slot's probability, so the pool is decoded whole (the reference, for quality runs)."""
        k_new, v_new, live = self.fresh if self.fresh is not None else (None, None, None)
        coded = self.lens - live.long() if live is not None else self.lens
        k, v = self.coded_pools()
        if not self.policy.observes:
            return decode_attention_quant_paged(q, k, v, self.block_table, coded, k_new, v_new, live, scale,
                                                owned=self.owners()), None
        keys, values = self.with_fresh(self.pair_view(k.decode(dtype=q.dtype), 0), self.pair_view(v.decode(dtype=q.dtype), 0))
        out, p = decode_attention_padded(q, keys, values, self.lens, scale)
        probs = torch.zeros_like(self.score_pool, dtype=p.dtype)
        b, h, s = (torch.arange(p.shape[-1], device=q.device) < self.lens[..., None]).nonzero(as_tuple=True)
        blk, off = self.locate(b, h, s)
        probs[blk, off] = p[b, h, s]
        return out, probs

    def allowed_slots(self) -> torch.Tensor:
        """(B,) slots a sequence may hold now: the budget of what it has seen, or (question-aware, after prefill)
        the budget of its prompt plus every token generated since."""
        if self.prompt_seen is None:
            return self.policy.budget.slots(self.seen)
        return self.policy.budget.slots(self.prompt_seen) + (self.seen - self.prompt_seen)

    def stream(self, q, k, v, valid, scale, evict: bool = True) -> torch.Tensor:
        """Tokens one at a time (q, k, v (B, H, T, D) rotated): each is appended, attends, is observed, and
        (``evict``) the budget is enforced; returns (B, T, H, D)."""
        outs = []
        for t in range(q.shape[2]):
            self.append(k[:, :, t], v[:, :, t], valid[:, t])
            out, probs = self.attend(q[:, :, t], scale)
            if probs is not None:
                self.observe(probs)
            if evict:
                self.enforce()
            outs.append(out)
        return torch.stack(outs, dim=1)

    def store_prompt(self, q, k, v, valid, scale) -> torch.Tensor:
        """A policy that neither evicts nor observes: the prompt (q, k, v (B, H, T, D) rotated) attends in one
        causal pass, as Llama's own attention, and every real token becomes a slot at once, as ``stream``
        would leave them; returns (B, T, H, D)."""
        B, H, T, D = q.shape
        if not self.is_initialized:
            self._init_state(B, k.dtype, k.device)
        if self.quantized:  # earlier tokens as their codes give them back, each token itself exact (as decoding)
            keep_log = torch.where(valid, 0.0, MASKED).to(q.dtype)[:, None, :].expand(B, self.num_kv_heads, T)
            out = prefill_attention_quant(q, k, v, self.round_trip(k), self.round_trip(v), keep_log, scale)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
            mask = (causal & valid[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=q.device)  # pads: self
            g = H // k.shape[1]
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                 attn_mask=mask, scale=scale)
        n = valid.sum(-1)  # (B,) real tokens: left padding only, so they are the last n
        self.allocate_runs((-(-n // self.block_size))[:, None].expand(B, self.num_kv_heads))
        b, t = valid.nonzero(as_tuple=True)
        index = t - (T - n[b])  # the token's index among its sequence's real tokens
        for h in range(self.num_kv_heads):
            hh = torch.full_like(b, h)
            blk, off = self.place(b, hh, index, k[b, h, t], v[b, h, t], self.seen[b] + index)
            self.hist_pool[blk, off] = -1
        self.lens = self.lens + n[:, None]
        self.seen = self.seen + n
        return out.transpose(1, 2)

    def prefill_prompt(self, q, k, v, valid, scale) -> torch.Tensor:
        """Question-aware: cache the whole prompt, each token observed as it arrives, nothing evicted. The
        reference: one token at a time."""
        return self.stream(q, k, v, valid, scale, evict=False)

    def end_prefill(self) -> None:
        """Question-aware: the prompt is in, scored by all its queries; compress it to its budget once, as
        SnapKV does: the slots to drop are chosen together from one scoring, not re-scored after each drop."""
        self.prompt_seen = self.seen.clone()
        drop = (self.lens - self.allowed_slots()[:, None]).clamp(min=0)  # (B, H_kv)
        if not bool(drop.any()):
            return
        priority = self.policy.priority(self).double()
        big = torch.iinfo(torch.long).max
        pos = self.pair_view(self.pos_pool, big)
        live = pos != big
        group = torch.where(live, torch.isinf(priority).long(), 2)  # scored, protected, dead
        order = torch.where(group == 0, priority, pos.double()).argsort(dim=-1, stable=True)  # protected: oldest first
        order = order.gather(-1, group.gather(-1, order).argsort(dim=-1, stable=True))
        self.drop_in_order(drop, pos.gather(-1, order))

    def drop_in_order(self, drop: torch.Tensor, doomed: torch.Tensor) -> None:
        """Evict, one at a time, the first ``drop`` (B, H_kv) of each pair's slots holding the positions ``doomed``
        (B, H_kv, S) lists in the order they go."""
        for k in range(int(drop.max())):
            slot = (self.pair_view(self.pos_pool, -1) == doomed[..., k : k + 1]).long().argmax(-1)
            self.evict(drop > k, slot)

    def enforce(self) -> None:
        allowed = self.allowed_slots()[:, None]
        over = self.lens > allowed
        while bool(over.any()):
            self.evict(over, self.policy.choose(self, over))
            over = self.lens > allowed

    def side_state(self) -> tuple[torch.Tensor, ...]:
        """Each slot's position, score and attention history."""
        return self.pos_pool, self.score_pool, self.hist_pool
