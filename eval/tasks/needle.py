"""Needle in a haystack, from local text: a sentence carrying a 5-digit number is put at a given depth of
held-out stdlib code cut to a given length, and the model is asked to complete the sentence. Exact match
of the number; a (context length x depth) grid and its heat map."""

from __future__ import annotations

import random

from ..store import ItemStore
from . import run_items

SETTINGS = ("needle_contexts", "needle_depths")
NEEDLE = "# Remember this: the secret number of the archive is {n}.\n"
QUESTION = "\n# What is the secret number of the archive? Answer: the secret number of the archive is"


def haystack_tokens(tok, n_tokens: int) -> list[int]:
    from data import SourceSpec, documents

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
    cells = [(c, d) for c in opts.needle_contexts for d in opts.needle_depths]
    items = [(f"{c}/{d}", build(model.tok, c, d, opts.seed)) for c, d in cells]
    store = ItemStore(folder, model.name, "needle", {k: getattr(opts, k) for k in SETTINGS} | {"seed": opts.seed})

    def compute(payloads):
        texts, counts = model.generate([p for p, _ in payloads], 8)
        return [{"answer": t, "correct": t.strip().startswith(n), "counts": c}
                for (_, n), t, c in zip(payloads, texts, counts)]

    values = run_items(store, items, model.batch_size, compute, f"{model.name} needle")
    meter = model.cr_meter()
    for v in values.values():
        meter.add(v["counts"])
    grid = {f"{c}/{d}": float(values[f"{c}/{d}"]["correct"]) for c, d in cells}
    return {"accuracy": sum(grid.values()) / len(grid), "grid": grid, "contexts": list(opts.needle_contexts),
            "depths": list(opts.needle_depths), **meter.summary()}
