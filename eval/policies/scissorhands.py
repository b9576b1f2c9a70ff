"""Scissorhands (Liu et al., 2023, "Scissorhands: Exploiting the Persistence of Importance Hypothesis for
LLM KV Cache Compression at Test Time"): a token that has often received low attention within a history
window is unlikely to matter later. Over the last ``history`` steps, count for each cached token the steps
in which its attention was below 1/budget (below a uniform share); protect the ``recent`` newest tokens;
when the budget is exceeded, drop the tokens with the highest counts (ties: the oldest).

From the paper: the low-attention count over a history window, the recent window, compressing when the
budget is exceeded. Ours, not checked against the paper's text here: history 32 steps, recent 8 tokens,
and dropping just enough tokens to meet the budget (the paper drops a batch of m at once)."""

from __future__ import annotations

import torch

from .base import Budget, Policy


class Scissorhands(Policy):
    name = "scissorhands"

    def __init__(self, budget: Budget, history: int = 32, recent: int = 8):
        super().__init__(budget)
        self.history, self.recent = history, recent

    def priority(self, layer):
        threshold = 1.0 / self.budget.slots(layer.seen).to(torch.float32)[:, None, None, None]  # uniform share
        hist = layer.pair_view(layer.hist_pool, -1.0)  # (B, H_kv, S, history); -1 = step not observed
        count = ((hist >= 0) & (hist < threshold)).sum(-1).float()
        pos = layer.pair_view(layer.pos_pool, -1)
        seen = layer.seen[:, None, None]
        protected = (pos >= seen - self.recent) | (pos < 0)
        key = count + 0.5 * (1 - pos.float() / (seen.float() + 1))  # older first among equal counts
        return torch.where(protected, float("inf"), -key)  # the most often low-attention goes first
