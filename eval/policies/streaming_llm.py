"""StreamingLLM (Xiao et al., 2024, "Efficient Streaming Language Models with Attention Sinks"): keep the
first ``sinks`` tokens (attention sinks; 4 in the paper) and the most recent ones; evict the oldest
non-sink token. Keys keep their original RoPE positions (as in kvpress), not re-assigned cache positions."""

from __future__ import annotations

import torch

from .base import Budget, Policy


class StreamingLLM(Policy):
    name = "streaming_llm"

    def __init__(self, budget: Budget, sinks: int = 4):
        super().__init__(budget)
        self.sinks = sinks

    def priority(self, layer):
        pos = layer.pair_view(layer.pos_pool, -1)  # (B, H_kv, S)
        allowed = self.budget.slots(layer.seen)[:, None, None]
        sinks = torch.minimum(torch.full_like(allowed, self.sinks), allowed - 1)  # always keep the newest token
        return torch.where(pos >= sinks, pos.double(), float("inf"))  # the oldest non-sink goes first
