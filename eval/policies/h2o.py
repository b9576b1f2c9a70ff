"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"): keep the recent
tokens and the heavy hitters, tokens with the largest attention accumulated over all queries so far; the
paper's default splits the budget evenly between the two. Per KV head (its query heads' mean)."""

from __future__ import annotations

import torch

from .base import Budget, Policy


class H2O(Policy):
    name = "h2o"

    def __init__(self, budget: Budget, recent_fraction: float = 0.5):
        super().__init__(budget)
        self.recent_fraction = recent_fraction

    def observe(self, layer, probs):
        layer.score_pool += probs

    def observe_many(self, layer, probs):
        layer.score_pool += probs.sum(-2)

    def priority(self, layer):
        score = layer.pair_view(layer.score_pool, float("inf"))  # (B, H_kv, S)
        pos = layer.pair_view(layer.pos_pool, -1)
        recent = (self.budget.slots(layer.seen).double() * self.recent_fraction).long()[:, None, None]
        protected = (pos >= (layer.seen[:, None, None] - recent)) | (pos < 0)
        return torch.where(protected, float("inf"), score)  # a budget all recent: the oldest goes
