"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): at every step, evict the token with the
lowest attention from the current query, averaged over all heads of the layer (one decision per layer:
every KV head drops the same token, so their slot lists stay aligned)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .policy import Policy


@dataclass
class TOVA(Policy):
    name: ClassVar[str] = "tova"

    def observe(self, layer, probs):
        layer.score_pool.copy_(probs)  # only the current query counts

    def observe_many(self, layer, probs):
        layer.score_pool.copy_(probs[..., -1, :])

    def priority(self, layer):
        score = layer.pair_view(layer.score_pool, float("inf"))  # (B, H_kv, S)
        return score.mean(1, keepdim=True).expand_as(score)  # the head mean: every head drops the same token
