"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks"): keep the
first ``sinks`` tokens (attention sinks; 4 in the paper) and the most recent ones; evict the oldest
non-sink token. Keys keep their original RoPE positions (as in kvpress), not re-assigned cache positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Policy


@dataclass
class StreamingLLM(Policy):
    sinks: int = 4  # first tokens always kept (the attention sinks)
    name: ClassVar[str] = "streaming_llm"

    def priority(self, layer):
        pos = layer.pair_view(layer.pos_pool, -1)  # (B, H_kv, S)
        allowed = self.budget.slots(layer.seen)[:, None, None]
        sinks = torch.minimum(torch.full_like(allowed, self.sinks), allowed - 1)  # always keep the newest token
        return torch.where(pos >= sinks, pos.double(), float("inf"))  # the oldest non-sink goes first

    def replay(self, n: int, allowed: list[int]) -> tuple[list[list[int]], list[int]]:
        """``priority`` and the layer's one-at-a-time eviction (the last slot moves into the freed one), played on
        positions: what each token sees, and the slots left in their order."""
        import bisect

        slots, kept, seen_by = [], [], []  # slot order; the same positions sorted
        for t in range(n):
            slots.append(t)
            kept.append(t)
            seen_by.append(list(kept))
            budget = allowed[t + 1]
            while len(slots) > budget:
                sinks = min(self.sinks, budget - 1)
                j = bisect.bisect_left(kept, sinks)  # the oldest non-sink; if every slot is a sink, the oldest
                gone = kept.pop(j if j < len(kept) else 0)
                i = slots.index(gone)
                slots[i] = slots[-1]
                slots.pop()
        return seen_by, slots
