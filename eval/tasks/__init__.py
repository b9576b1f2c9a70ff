"""Evaluation tasks. Each module has ``run(model, opts, folder) -> dict`` and ``SETTINGS`` (option names
that change its results: a change starts a fresh item cache)."""

from __future__ import annotations

import importlib

from tqdm.auto import tqdm

from ..store import ItemStore

TASKS = ("ppl", "ppl_prose", "mmlu", "humaneval", "needle", "speed")


class TaskError(ValueError):
    """Bad task input (a missing dataset, an unknown task); the message says how to fix it."""


def task_module(name: str):
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return importlib.import_module(f"{__name__}.{name}")


def run_items(store: ItemStore, items: list[tuple[str, object]], batch: int, compute, desc: str,
              group=None) -> dict[str, dict]:
    """Compute the items not in ``store`` in batches (``compute(payloads) -> values``), storing each as it
    finishes; return every item's value. ``group(item_id)``: items of different groups never share a batch
    (prompts of one length together, so no row is padded to another's length). Progress bar with ETA;
    cached items are counted as done."""
    todo = [(i, p) for i, p in items if i not in store]
    groups: dict = {}
    for item in todo:
        groups.setdefault(group(item[0]) if group else None, []).append(item)
    chunks = [g[s : s + batch] for g in groups.values() for s in range(0, len(g), batch)]
    with tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, unit="item", dynamic_ncols=True) as bar:
        for chunk in chunks:
            for (item_id, _), value in zip(chunk, compute([p for _, p in chunk])):
                store.put(item_id, value)
            bar.update(len(chunk))
    return {i: store.get(i) for i, _ in items}
