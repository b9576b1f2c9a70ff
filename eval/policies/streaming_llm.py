"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks"): keep the
first ``sinks`` tokens (attention sinks; 4 in the paper) and the most recent ones; evict the oldest
non-sink token. Keys keep their original RoPE positions (as in kvpress), not re-assigned cache positions."""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from .policy import Policy


@dataclass
class StreamingLLM(Policy):
    sinks: int = 4  # first tokens always kept (the attention sinks)
    name: ClassVar[str] = "streaming_llm"

    def priority(self, layer):
        pos = layer.pair_view(layer.pos_pool, -1)  # (B, H_kv, S)
        allowed = self.budget.slots(layer.seen)[:, None, None]
        sinks = torch.minimum(torch.full_like(allowed, self.sinks), allowed - 1)  # always keep the newest token
        return torch.where(pos >= sinks, pos.double(), float("inf"))  # the oldest non-sink goes first

    def replay(self, n: int, allowed: list[int]) -> tuple[torch.Tensor, list[int]]:
        return _replay(self.sinks, n, tuple(allowed))


@lru_cache(maxsize=64)  # one per prompt length and budget: every layer and every batch of equal prompts asks again
def _replay(sinks: int, n: int, allowed: tuple[int, ...]) -> tuple[torch.Tensor, list[int]]:
    """``StreamingLLM.priority`` and the layer's one-at-a-time eviction (the last slot moves into the freed one),
    played on positions: (which positions each token sees, (n, n) bool; the slots left, in their order)."""
    slots, kept = [], []  # slot order; the same positions sorted
    member = torch.zeros(n, dtype=torch.bool)
    seen = torch.zeros(n, n, dtype=torch.bool)
    for t in range(n):
        slots.append(t)
        kept.append(t)
        member[t] = True
        seen[t] = member
        budget = allowed[t + 1]
        while len(slots) > budget:
            first = min(sinks, budget - 1)
            j = bisect.bisect_left(kept, first)  # the oldest non-sink; if every slot is a sink, the oldest
            gone = kept.pop(j if j < len(kept) else 0)
            member[gone] = False
            i = slots.index(gone)
            slots[i] = slots[-1]
            slots.pop()
    return seen, slots
