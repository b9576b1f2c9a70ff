"""Scissorhands (Liu et al., 2023, "Scissorhands: Exploiting the Persistence of Importance Hypothesis for
LLM KV Cache Compression at Test Time"): a token that has often received low attention within a history
window is unlikely to matter later. Over the last ``history`` steps, count for each cached token the steps
in which its attention was below 1/budget (below a uniform share); protect the ``recent`` newest tokens;
when the budget is exceeded, drop the tokens with the highest counts (ties: the oldest).

From the paper: the low-attention count over a history window, the recent window, compressing when the
budget is exceeded. Ours, not checked against the paper's text here: history 32 steps, recent 8 tokens,
and dropping just enough tokens to meet the budget (the paper drops a batch of m at once)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .policy import Policy


@dataclass
class Scissorhands(Policy):
    history: int = 32  # steps of attention counted (the history ring)
    recent: int = 8  # newest tokens always kept
    name: ClassVar[str] = "scissorhands"

    def priority(self, layer):
        threshold = 1.0 / self.budget.slots(layer.seen).to(torch.float32)[:, None, None, None]  # uniform share
        # (B, H_kv, S, history); -1 = step not observed; dead slots are protected below, so left unmasked here (the
        # history is the largest pool: masking it cost more than the rest of the choice)
        hist = layer.slot_view(layer.hist_pool)
        count = ((hist >= 0) & (hist < threshold)).sum(-1).float()
        pos = layer.pair_view(layer.pos_pool, -1)
        key = count + 0.5 * (1 - pos.float() / (layer.seen[:, None, None].float() + 1))  # older first among equals
        return self.protect_recent(layer, -key, self.recent)  # the most often low-attention goes first
