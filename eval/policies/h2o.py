"""H2O (Zhang et al., 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"): keep the recent
tokens and the heavy hitters, tokens with the largest attention accumulated over all queries so far; the
paper's default splits the budget evenly between the two. Per KV head (its query heads' mean)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .policy import Policy


@dataclass
class H2O(Policy):
    recent_fraction: float = 0.5  # share of the budget kept for the newest tokens
    name: ClassVar[str] = "h2o"

    def observe(self, layer, probs):
        layer.score_pool += probs

    def observe_many(self, layer, probs):
        layer.score_pool += probs.sum(-2)

    def priority(self, layer):
        score = layer.pair_view(layer.score_pool, float("inf"))  # (B, H_kv, S) attention accumulated so far
        recent = (self.budget.slots(layer.seen).double() * self.recent_fraction).long()
        return self.protect_recent(layer, score, recent)  # a budget all recent: the oldest goes
