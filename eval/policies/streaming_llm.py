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
