"""SnapKV (Li et al., 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"): score each
cached token by the attention it gets from an observation window of the latest queries (32 in the paper's
code), smooth the scores over neighbouring positions (average pooling, kernel 7), keep the window's own
tokens and the best-scored rest. Per KV head (its query heads' mean).

The paper applies this once, at the end of the prompt: the question-aware setting (``PolicyCache(...,
question_aware=True)``) does that, choosing every dropped token from one scoring. In the query-agnostic
setting budgets apply as the sequence grows, so the same rule runs whenever the cache exceeds its budget,
with the window being the latest ``window`` queries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from .policy import Policy


@dataclass
class SnapKV(Policy):
    window: int = 32  # observation window: the latest queries that score the cache (and are kept)
    kernel: int = 7  # average-pooling width over neighbouring positions
    name: ClassVar[str] = "snapkv"

    @property
    def history(self) -> int:  # the observation window is the attention history kept per slot
        return self.window

    def priority(self, layer):
        score = layer.slot_view(layer.hist_pool).clamp(min=0).sum(-1)  # (B, H_kv, S): the live slots' only
        score = torch.where(layer.pair_view(layer.pos_pool, -1) >= 0, score, float("nan"))
        pos = layer.pair_view(layer.pos_pool, torch.iinfo(torch.long).max)
        order = pos.argsort(-1)  # pooling runs over neighbouring positions, not slot order
        ordered = score.gather(-1, order)
        B, H, S = ordered.shape
        live = ~ordered.isnan()
        flat, ones = ordered.nan_to_num(0).reshape(B * H, 1, S), live.to(ordered.dtype).reshape(B * H, 1, S)
        pad = self.kernel // 2
        pooled = F.avg_pool1d(flat, self.kernel, 1, pad, count_include_pad=True)
        count = F.avg_pool1d(ones, self.kernel, 1, pad, count_include_pad=True)
        pooled = (pooled / count.clamp(min=1e-9)).reshape(B, H, S)  # mean over live neighbours only
        smooth = torch.empty_like(pooled).scatter_(-1, order, pooled)
        return self.protect_recent(layer, smooth, self.window)
