"""Needle in a haystack, from local text: a sentence carrying a 5-digit number is put at a given depth of
held-out stdlib code cut to a given length, and the model is asked to complete the sentence. Exact match
of the number; a (context length x depth) grid and its heat map. A model under a cache policy is also run in
the question-aware setting (``question_aware_*``: the prompt compressed once, after prefill, with the question
in view); the default is query-agnostic, as DMC is."""

from __future__ import annotations

import random

from ..store import ItemStore, digest
from . import TaskError, run_rows, sweep_name

SETTINGS = ("needle_contexts", "needle_depths")
NEEDLE = "# Remember this: the secret number of the archive is {n}.\n"
QUESTION = "\n# What is the secret number of the archive? Answer: the secret number of the archive is"


def haystack_tokens(tok, n_tokens: int) -> list[int]:
    from dmc.data import SourceSpec, documents

    ids: list[int] = []
    for _, text in documents(SourceSpec(kind="stdlib", split="validation")):
        ids += tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= n_tokens:
            return ids[:n_tokens]
    return ids


def build(tok, context: int, depth: float, seed: int) -> tuple[str, str]:
    """(prompt of about ``context`` tokens with the needle at ``depth``, the expected number)."""
    number = str(random.Random(f"{seed}/{context}/{depth}").randint(10000, 99999))
    needle, question = NEEDLE.format(n=number), QUESTION
    budget = context - len(tok(needle + question, add_special_tokens=False)["input_ids"])
    hay = tok.decode(haystack_tokens(tok, max(budget, 0)))
    lines = hay.splitlines(keepends=True)  # insert at a line boundary so the needle reads as a comment
    cut = round(depth * len(lines))
    return "".join(lines[:cut]) + needle + "".join(lines[cut:]) + question, number


def run(model, opts, folder) -> dict:
    return run_sweep(model, [(model, None)], opts, folder)[0]


def run_sweep(model, variants: list, opts, folder) -> list[dict]:
    """The task for several variants of one loaded model at once: ``variants`` are (the variant's EvalModel view,
    its policy CR or None); one result per variant."""
    cells = _cells(opts)
    if opts.ci_resamples:  # before any model runs
        from ..intervals import require_samples

        try:
            require_samples(len(cells), "cells", "give more --needle-contexts or --needle-depths")
        except TaskError as err:
            raise TaskError(f"needle: {err}") from None
    items = [(f"{c}/{d}", build(model.tok, c, d, opts.seed)) for c, d in cells]
    settings, crs = store_settings(opts), [cr for _, cr in variants]
    name = sweep_name(variants)

    def scorer(question_aware: bool):
        def compute(payloads, row_crs):
            texts, counts = model.greedy([p for p, _ in payloads], 8, question_aware=question_aware, crs=row_crs)
            return [{"answer": t, "correct": t.strip().startswith(n), "counts": c, "data": digest(p)}
                    for (p, n), t, c in zip(payloads, texts, counts)]

        return compute

    stores = [ItemStore(folder, view, "needle", settings) for view, _ in variants]
    values = run_rows(stores, crs, items, model.batch_size, scorer(False), f"{name} needle", _context)
    qa = [None] * len(variants)
    if model.policy is not None and model.policy.evicts:
        # The same cells in the question-aware setting (compress once after prefill, the question in the
        # policy's observation window). DMC is query-agnostic by construction, so this row has no DMC twin.
        qa_stores = [ItemStore(folder, view, QUESTION_AWARE, settings) for view, _ in variants]
        qa = run_rows(qa_stores, crs, items, model.batch_size, scorer(True), f"{name} needle, question-aware",
                      _context)
    return [summarize(v, opts, model.kv_cr, q) for v, q in zip(values, qa)]


QUESTION_AWARE = "needle-question-aware"  # the store's task name for the question-aware setting's items


def store_settings(opts) -> dict:
    """The settings an item store of this task is keyed by."""
    return {k: getattr(opts, k) for k in SETTINGS} | {"seed": opts.seed}


def _cells(opts) -> list[tuple[int, float]]:
    return [(c, d) for c in opts.needle_contexts for d in opts.needle_depths]


def item_ids(opts) -> list[str]:
    return [f"{c}/{d}" for c, d in _cells(opts)]


def summarize(values: dict[str, dict], opts, fixed_cr: float = 1.0, question_aware: dict | None = None) -> dict:
    """The task's result from its items alone (``question_aware``: that setting's items, for a policy)."""
    cells = _cells(opts)
    result = _summary(fixed_cr, opts, cells, values)
    result |= {"contexts": list(opts.needle_contexts), "depths": list(opts.needle_depths)}
    if question_aware is not None:
        qa = _summary(fixed_cr, opts, cells, question_aware)
        result |= {f"question_aware_{k}": qa[k] for k in ("accuracy", "accuracy_ci95", "grid", "realised_cr") if k in qa}
    return result


def _context(item_id: str) -> str:
    """A cell's context length: cells batch with their own length only (a padded row costs the longest's)."""
    return item_id.split("/")[0]


def _summary(fixed_cr, opts, cells, values) -> dict:
    from ..lm import CRMeter

    meter = CRMeter(fixed_cr)
    for v in values.values():
        meter.add(v["counts"])
    grid = {f"{c}/{d}": float(values[f"{c}/{d}"]["correct"]) for c, d in cells}
    result = {"accuracy": sum(grid.values()) / len(grid), "cells": len(grid), "grid": grid}
    if opts.ci_resamples:
        from ..intervals import mean_interval

        result["accuracy_ci95"] = mean_interval(list(grid.values()), "cells", resamples=opts.ci_resamples,
                                                seed=opts.seed)
    return result | meter.summary()
