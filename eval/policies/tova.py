"""TOVA (Oren et al., 2024, "Transformers are Multi-State RNNs"): at every step, evict the token with the
lowest attention from the current query, averaged over all heads of the layer (one decision per layer:
every KV head drops the same token, so their slot lists stay aligned)."""

from __future__ import annotations

from .base import Policy


class TOVA(Policy):
    name = "tova"

    def observe(self, layer, probs):
        layer.score_pool.copy_(probs)  # only the current query counts

    def choose(self, layer, over):
        score = layer.pair_view(layer.score_pool, float("inf")).mean(1, keepdim=True)  # (B, 1, S) head mean
        return score.argmin(-1).expand_as(over)
