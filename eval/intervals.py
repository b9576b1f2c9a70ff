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


# ---- paired comparisons: two methods scored on the same items ----------------------------------------------
# Perplexity varies between blocks far more than between methods, so two methods' own intervals overlap even
# where one is better on nearly every block. Resampling the shared items once for both and recomputing the
# difference on each resample keeps that between-item variance out of the comparison.

def shared_items(a: dict, b: dict, what: str, names: tuple[str, str]) -> list[str]:
    """The item ids both ``a`` and ``b`` (id -> value with a "data" digest, where stored) hold, in a fixed
    order; refused where the two scored different inputs under one id, or share fewer than 2 items."""
    shared = sorted(set(a) & set(b), key=_natural)
    differ = [i for i in shared if a[i].get("data") != b[i].get("data")]
    if differ:
        raise TaskError(f"{names[0]} and {names[1]} were scored on different {what} ({differ[0]} differs): "
                        f"evaluate both on the same data (same --ppl-source / needle settings and Python version)")
    require_samples(len(shared), f"shared {what}", f"{names[0]} and {names[1]} share {len(shared)}; evaluate both "
                    "on the same items")
    return shared


def _natural(item_id: str):
    """block2 before block10; needle cells by context, then depth."""
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", item_id)]


def paired_ppl_ratio(a: dict, b: dict, names: tuple[str, str] = ("A", "B"), resamples: int = 1000, seed: int = 0,
                     indices: np.ndarray | None = None) -> dict:
    """Perplexity of ``a`` over that of ``b`` on their shared blocks (id -> {"nll", "tokens"}), as exp of the
    difference in mean log-perplexity (nats per token), with its paired 95% interval: each resample draws the
    blocks once and scores both methods on them."""
    ids = shared_items(a, b, "blocks", names)
    nll_a, nll_b = (np.array([m[i]["nll"] for i in ids], dtype=np.float64) for m in (a, b))
    tok_a, tok_b = (np.array([m[i]["tokens"] for i in ids], dtype=np.float64) for m in (a, b))

    def log_ratio(i):
        return nll_a[i].sum() / tok_a[i].sum() - nll_b[i].sum() / tok_b[i].sum()

    rows = resample_indices(len(ids), resamples, seed) if indices is None else np.asarray(indices)
    lo, hi = percentile_interval([log_ratio(r) for r in rows])
    return {"ratio": math.exp(log_ratio(np.arange(len(ids)))), "ci95": [math.exp(lo), math.exp(hi)],
            "items": len(ids)}


def paired_accuracy_difference(a: dict, b: dict, names: tuple[str, str] = ("A", "B"), resamples: int = 1000,
                               seed: int = 0, indices: np.ndarray | None = None) -> dict:
    """Accuracy of ``a`` minus that of ``b`` on their shared cells (id -> {"correct"}), with its paired 95%
    interval over the cells."""
    ids = shared_items(a, b, "cells", names)
    diff = np.array([float(a[i]["correct"]) - float(b[i]["correct"]) for i in ids])
    rows = resample_indices(len(ids), resamples, seed) if indices is None else np.asarray(indices)
    lo, hi = percentile_interval([diff[r].mean() for r in rows])
    return {"difference": float(diff.mean()), "ci95": [lo, hi], "items": len(ids)}


def verdict(ci: Sequence[float], no_effect: float, lower_is_better: bool) -> str:
    """"better" / "worse" where the paired interval excludes ``no_effect`` (1 for a ratio, 0 for a difference),
    else "no difference shown"."""
    lo, hi = ci
    if lo <= no_effect <= hi:
        return "no difference shown"
    below = hi < no_effect
    return "better" if below == lower_is_better else "worse"
