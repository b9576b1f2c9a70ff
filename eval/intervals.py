"""Bootstrap 95% intervals over evaluation items (ppl blocks, needle cells): resample the items with
replacement, recompute the statistic, take the percentiles. The percentile bootstrap (Efron & Tibshirani 1993,
ch. 13); the resamples come from a seeded generator, so a rerun gives the same interval."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from .tasks import TaskError

LEVEL = 0.95


def resample_indices(n: int, resamples: int, seed: int = 0) -> np.ndarray:
    """(resamples, n) item indices drawn with replacement."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def percentile_interval(stats: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The (1 - level) / 2 and (1 + level) / 2 quantiles, interpolated linearly between order statistics."""
    lo, hi = np.quantile(np.asarray(stats, dtype=np.float64), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def require_samples(n: int, what: str, more: str | None = None) -> None:
    """Refuse an interval over fewer than 2 items; ``more`` says how to evaluate more of them."""
    if n < 2:
        raise TaskError(f"a bootstrap interval needs at least 2 {what} (got {n}): {more or f'evaluate more {what}'}, "
                        "or pass --ci-resamples 0 for no intervals")


def bootstrap(n: int, statistic: Callable[[np.ndarray], float], what: str, resamples: int = 1000, seed: int = 0,
              indices: np.ndarray | None = None) -> tuple[float, float]:
    """The interval of ``statistic(item indices)`` over ``n`` items (``indices``: given resamples instead)."""
    require_samples(n, what)
    rows = resample_indices(n, resamples, seed) if indices is None else np.asarray(indices)
    return percentile_interval([statistic(row) for row in rows])


def perplexity_interval(nll: Sequence[float], tokens: Sequence[int], **kw) -> tuple[float, float]:
    """Perplexity exp(sum nll / sum tokens) with blocks as the resampled items."""
    nll, tokens = np.asarray(nll, dtype=np.float64), np.asarray(tokens, dtype=np.float64)
    return bootstrap(len(nll), lambda i: math.exp(nll[i].sum() / tokens[i].sum()), "blocks", **kw)


def mean_interval(values: Sequence[float], what: str, **kw) -> tuple[float, float]:
    values = np.asarray(values, dtype=np.float64)
    return bootstrap(len(values), lambda i: float(values[i].mean()), what, **kw)
