"""Training-free KV-cache policies on the same paged storage, attention code and bytes accounting as DMC.

A vanilla Llama gets ``PolicyLlamaAttention`` modules (``apply_policy``) and a ``PolicyCache``. Every token,
prompt tokens included, is processed the way a deployed model with that policy would: its key/value is
appended to its sequence's slots (RoPE already applied, as usual for eviction methods), it attends over the
slots with the same paged attention as DMC decoding, the policy updates its per-slot scores from that
attention, and slots are evicted until the budget holds. Budgets: ``Budget(cr=c)`` keeps ceil(seen / c)
slots as the sequence grows; ``Budget(tokens=n)`` keeps n.

Two settings. Query-agnostic (the default, and DMC's by construction): the budget holds at every token, so
eviction happens while the prompt streams in and cannot know the question at its end. Question-aware
(``PolicyCache(..., question_aware=True)``, SnapKV's protocol): the prompt is cached whole, the policy scores it
with every prompt query (its observation window holds the question), and it is compressed once, after
prefill, to the budget of the prompt; generated tokens are then appended on top of that budget.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from dmc.metrics import head_dim
from dmc.ops.decode_attention import decode_attention_paged
from dmc.ops.quant_attention import decode_attention_quant_paged
from dmc.ops.quant_prefill import prefill_attention_quant
from dmc.ops.train_attention import MASKED
from dmc.slot_cache import SlotCache, SlotCacheLayer


@dataclass(frozen=True)
class Budget:
    cr: float | None = None
    tokens: int | None = None

    def __post_init__(self):
        if (self.cr is None) == (self.tokens is None):
            raise ValueError("give a budget as either cr=... (>= 1) or tokens=... (>= 1)")
        if (self.cr is not None and self.cr < 1) or (self.tokens is not None and self.tokens < 1):
            raise ValueError(f"budget out of range: {self}; use cr >= 1 or tokens >= 1")

    def slots(self, seen: torch.Tensor) -> torch.Tensor:
        """Slots allowed per sequence after ``seen`` (B,) real tokens."""
        if self.cr is not None:
            return torch.ceil(seen.double() / self.cr - 1e-9).long().clamp(min=1)
        return seen.clamp(max=self.tokens)


@dataclass(frozen=True)
class RowBudgets:
    """One CR per batch row (B,): row b keeps ceil(seen / crs[b]) slots, as ``Budget(cr=crs[b])`` would. A sweep
    (``run.evaluate_variants``) runs several CRs of one policy in one batch this way."""

    crs: tuple[float, ...]

    def __post_init__(self):
        # the budget is asked for every token of every layer: the tensor is made once
        object.__setattr__(self, "_crs", torch.tensor(self.crs, dtype=torch.float64))

    def slots(self, seen: torch.Tensor) -> torch.Tensor:
        """``seen``: (B,) or (B, steps)."""
        crs = self._crs.to(seen.device).view(-1, *[1] * (seen.dim() - 1))
        return torch.ceil(seen.double() / crs - 1e-9).long().clamp(min=1)


@dataclass
class Policy:
    """Decides which slot to drop (kvpress's scorer presses, as dataclasses citing their paper). ``observe``
    sees each step's attention; ``priority`` orders each pair's slots for eviction; ``choose`` names, for every
    pair over budget, the slot (index into that pair's slot list) to evict."""

    budget: Budget
    name: ClassVar[str] = "policy"
    history: ClassVar[int] = 0  # > 0: each slot's attention over the last ``history`` steps (``hist_pool``; -1 unseen)
    observes: ClassVar[bool] = True  # False: never looks at attention (the layer skips computing it)
    evicts: ClassVar[bool] = True  # False: keeps every token (a prompt is then stored in one pass)

    def replay(self, n: int, allowed: list[int]) -> tuple[torch.Tensor, list[int]] | None:
        """For a policy whose choices depend on positions alone: which positions each of a prompt's ``n`` tokens
        attends to ((n, n) bool, itself included) and the slots left after it, in slot order, as the token-by-token
        path would leave them (``allowed[s]``: slots allowed after ``s`` tokens), so the prompt can attend in one
        pass. None: the policy reads attention, so the prompt streams."""
        return None

    @property
    def label(self) -> str:
        b = self.budget
        return f"{self.name}@{b.cr:g}x" if b.cr is not None else f"{self.name}@{b.tokens}tok"

    def observe(self, layer: PolicyLayer, probs: torch.Tensor) -> None:
        """probs: this step's attention per pool slot (group mean), shaped like ``layer.score_pool``."""

    def observe_many(self, layer: PolicyLayer, probs: torch.Tensor) -> None:
        """probs (..., steps, slots): several consecutive steps' attention at once (a prompt's queries)."""
        for i in range(probs.shape[-2]):
            self.observe(layer, probs[..., i, :])

    def priority(self, layer: PolicyLayer) -> torch.Tensor:
        """(B, H_kv, slots) eviction order of each pair's slots: the lowest goes first; +inf protects a slot
        (protected slots go only when nothing else is left, the oldest first)."""
        raise NotImplementedError

    def choose(self, layer: PolicyLayer, over: torch.Tensor) -> torch.Tensor:
        """The slot each pair drops next: the lowest priority, or the oldest slot when all are protected."""
        priority = self.priority(layer)
        protected = torch.isinf(priority).all(-1)
        if not bool(protected.any()):  # the fallback is rare: not computed for every token
            return priority.argmin(-1)
        return torch.where(protected, layer.oldest_slot(), priority.argmin(-1))

    @staticmethod
    def protect_recent(layer: PolicyLayer, priority: torch.Tensor, recent) -> torch.Tensor:
        """``priority`` (B, H_kv, S) with each sequence's ``recent`` (int or (B,)) newest tokens and the dead
        slots set to +inf."""
        pos = layer.pair_view(layer.pos_pool, -1)
        recent = torch.as_tensor(recent, device=pos.device).reshape(-1, 1, 1)
        protected = (pos >= layer.seen[:, None, None] - recent) | (pos < 0)
        return torch.where(protected, float("inf"), priority)


def attend_slots(q, keys, values, lens, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, H, D) over each pair's slots keys, values (B, H_kv, S, D), of which the first ``lens`` (B, H_kv) live:
    (output (B, H, D), attention per slot (B, H_kv, S), group mean, 0 where dead; a pair without slots gives 0)."""
    B, H, D = q.shape
    H_kv, S = keys.shape[1], keys.shape[2]
    work = torch.promote_types(q.dtype, torch.float32)
    scores = (q.view(B, H_kv, H // H_kv, D) @ keys.transpose(-1, -2)).to(work) * scale
    live = torch.arange(S, device=q.device) < lens[..., None]  # (B, H_kv, S)
    p = scores.masked_fill(~live[:, :, None], float("-inf")).softmax(-1)
    p = torch.where((lens > 0)[..., None, None], p, 0)  # no slots yet (left padding): 0, not NaN
    return (p.to(q.dtype) @ values).reshape(B, H, D), p.mean(2)


class PolicyLayer(SlotCacheLayer):
    update_hint = "PolicyCache is filled by PolicyLlamaAttention; run apply_policy(model) first"
    # per-slot position, score and attention history live beside the keys, block for block
    slot_pools = ("k_pool", "v_pool", "pos_pool", "score_pool", "hist_pool")
    row_state = ("seen",)

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
        self.init_pool(batch, dtype, device)
        self.pos_pool = torch.zeros(0, self.block_size, dtype=torch.long, device=device)
        self.score_pool = torch.zeros(0, self.block_size, dtype=torch.float32, device=device)
        self.hist_pool = torch.zeros(0, self.block_size, self.policy.history, dtype=torch.float32, device=device)
        self.seen = torch.zeros(batch, dtype=torch.long, device=device)
        self.steps = 0  # attention observations so far (indexes the history ring)
        self.is_initialized = True

    def observe(self, probs: torch.Tensor) -> None:
        """This step's attention per pool slot: the policy's own scores, then the history ring (policies
        with ``history``)."""
        self.policy.observe(self, probs)
        if self.policy.history:
            self.hist_pool[..., self.steps % self.policy.history] = probs
        self.steps += 1

    def slot_view(self, pool: torch.Tensor) -> torch.Tensor:
        """(B, H_kv, max slots, *extra) of a per-slot pool (blocks, block_size, *extra), dead slots holding whatever
        their place holds (finite): for a score whose dead slots the policy masks afterwards anyway."""
        S = max(1, int(self.lens.max()))
        table = self.block_table[..., : -(-S // self.block_size)].clamp(min=0)
        return pool[table].flatten(2, 3)[:, :, :S]

    def pair_view(self, pool: torch.Tensor, fill) -> torch.Tensor:
        """``slot_view`` with the dead slots holding ``fill``."""
        view = self.slot_view(pool)
        S = view.shape[2]
        live = torch.arange(S, device=pool.device) < self.lens[..., None]
        live = live.view(*live.shape, *[1] * (pool.dim() - 2))
        return torch.where(live, view, torch.as_tensor(fill, dtype=pool.dtype, device=pool.device))

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
        self.write(b, h, slot[b, h], keys[b, h], values[b, h])
        blk, off = self.locate(b, h, slot[b, h])
        self.pos_pool[blk, off] = self.seen[b]
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
        out, p = attend_slots(q, keys, values, self.lens, scale)
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
            self.write(b, hh, index, k[b, h, t], v[b, h, t])
            blk, off = self.locate(b, hh, index)
            self.pos_pool[blk, off] = self.seen[b] + index
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


class PolicyCache(SlotCache):
    """A ``Cache`` whose layers keep at most the policy's budget of slots per (sequence, KV head).

    ``layout``: "paged" (the reference: DMC's paged pool and its bytes) or "dense" (``dense.py``: the same
    slots and decisions in per-pair buffers, several times less bookkeeping per token; for quality runs)."""

    def __init__(self, config, policy: Policy, block_size: int = 16, question_aware: bool = False,
                 layout: str = "paged", kv_bits: int = 16, kv_group: int | None = None):
        from .dense import DensePolicyLayer

        layers = {"paged": PolicyLayer, "dense": DensePolicyLayer}
        if layout not in layers:
            raise ValueError(f"unknown cache layout {layout!r}; choose paged or dense")
        H_kv = config.num_key_value_heads
        D = head_dim(config)
        super().__init__(layers=[layers[layout](H_kv, D, block_size, policy, question_aware, kv_bits, kv_group)
                                 for _ in range(config.num_hidden_layers)])
        self.policy, self.question_aware = policy, question_aware

    def defer_compression(self) -> None:
        """Question-aware: the prompt's prefill leaves it whole, for ``branch`` to compress once per budget."""
        if not self.question_aware or any(layer.seen_tokens for layer in self.layers):
            raise ValueError("defer_compression is for a question-aware cache before its prompt")
        for layer in self.layers:
            layer.compress_after_prefill = False

    def branch(self, rows: list[int], crs: list[float]) -> None:
        """After a deferred prefill: row i of the cache becomes the prompt ``rows[i]`` compressed to the budget of
        ``crs[i]`` (the same prompt under several CRs, each from one prefill; the prompt's scoring does not depend
        on the budget, so each row equals a prefill of its own)."""
        from dataclasses import replace

        policy = replace(self.policy, budget=RowBudgets(tuple(crs)))
        index = torch.tensor(rows, dtype=torch.long)
        if not all(hasattr(layer, "branch") for layer in self.layers):
            raise ValueError("branch needs the dense layout")
        for layer in self.layers:
            if layer.compress_after_prefill or not layer.seen_tokens:
                raise ValueError("branch follows a prefill with defer_compression()")
            layer.branch(index.to(layer.lens.device), policy)
        self.policy = policy


def _valid_tokens(attention_mask, B: int, T: int, past: int, device) -> torch.Tensor:
    """(B, T) real-token flags from the mask the Llama model hands its layers (None, 4D bool or additive)."""
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    i = torch.arange(T, device=device)
    diag = attention_mask[:, 0, i, past + i]  # a token sees itself unless it is padding
    return diag if diag.dtype == torch.bool else diag == 0


def _left_padded(valid: torch.Tensor) -> bool:
    """A prompt of several tokens whose padding, if any, comes first."""
    return valid.shape[1] > 1 and not bool((valid[:, 1:].long() < valid[:, :-1].long()).any())


class PolicyLlamaAttention(LlamaAttention):
    """Llama attention that, given a ``PolicyCache``, runs each token through the policy's cache."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        if not isinstance(past_key_values, PolicyCache):
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        layer = past_key_values.layers[self.layer_idx]
        valid = _valid_tokens(attention_mask, B, T, layer.seen_tokens, q.device)
        if layer.question_aware and layer.seen_tokens == 0:  # the prompt: cached whole, compressed after
            out = layer.prefill_prompt(q, k, v, valid, self.scaling)
            if layer.compress_after_prefill:  # else PolicyCache.branch compresses it, once per budget
                layer.end_prefill()
        elif not (layer.policy.evicts or layer.policy.observes) and layer.seen_tokens == 0 and _left_padded(valid):
            out = layer.store_prompt(q, k, v, valid, self.scaling)  # nothing to decide token by token
        else:
            out = layer.stream(q, k, v, valid, self.scaling)
        layer.seen_tokens += T
        out = out.reshape(B, T, -1)
        return self.o_proj(out), None


def apply_policy(model) -> list[nn.Module]:
    """Swap every Llama attention module for ``PolicyLlamaAttention`` (same weights; without a
    ``PolicyCache`` it computes exactly what Llama attention computes) and return the swapped modules.
    For a model the caller owns (``EvalModel`` loads its own); otherwise use ``policy_attention``."""
    swapped = []
    for layer in model.model.layers:
        attn = layer.self_attn
        if type(attn) is LlamaAttention:
            attn.__class__ = PolicyLlamaAttention
            swapped.append(attn)
    return swapped


@contextmanager
def policy_attention(model):
    """``with policy_attention(model):`` the model's attention runs policy caches; on leaving (an error
    included) every module is a plain ``LlamaAttention`` again, as kvpress removes its presses."""
    swapped = apply_policy(model)
    try:
        yield model
    finally:
        for attn in swapped:
            attn.__class__ = LlamaAttention

