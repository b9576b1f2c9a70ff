"""Evaluation tasks. Each module has ``run(model, opts, folder) -> dict`` and ``SETTINGS`` (option names
that change its results: a change starts a fresh item cache)."""

from __future__ import annotations

import importlib

from tqdm.auto import tqdm

from ..store import ItemStore

TASKS = ("ppl", "ppl_prose", "mmlu", "humaneval", "needle", "speed")


_BAR = {"position": None}  # this process's progress-bar line: a worker of `dmc compare --jobs` draws on its own


def set_bar_position(line: int | None) -> None:
    """The terminal line (0: the first) this process's task progress bars draw on; None: tqdm's default."""
    _BAR["position"] = line


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
    return run_rows([store], [None], items, batch, lambda payloads, _: compute(payloads), desc, group)[0]


def sweep_name(variants: list) -> str:
    """A sweep's progress-bar name: its first variant's, and how many CRs ride along."""
    return variants[0][0].name + (f" (+{len(variants) - 1} CRs)" if len(variants) > 1 else "")


def run_rows(stores: list[ItemStore], crs: list, items: list[tuple[str, object]], batch: int, compute, desc: str,
             group=None) -> list[dict[str, dict]]:
    """``run_items`` for several variants of one model at once (a policy at several CRs, ``run.evaluate_variants``): each
    item missing from a variant's store is a row, one variant's rows after another's, ``batch`` rows per call of
    ``compute(payloads, crs)`` (``crs``: each row's CR, or None when every variant has None); every variant's
    values, in ``stores`` order."""
    # variant-major: a batch holds as few budgets as it can, so its rows evict on the same steps and its widest
    # pair (which every row's attention is padded to) is not a CR-2 row's among CR-8 rows
    todo = [(i, p, k) for k, store in enumerate(stores) for i, p in items if i not in store]
    groups: dict = {}
    for row in todo:
        groups.setdefault(group(row[0]) if group else None, []).append(row)
    chunks = [g[s : s + batch] for g in groups.values() for s in range(0, len(g), batch)]
    total = len(items) * len(stores)
    with tqdm(total=total, initial=total - len(todo), desc=desc, unit="item", dynamic_ncols=True,
              position=_BAR["position"]) as bar:
        for chunk in chunks:
            row_crs = [crs[k] for *_, k in chunk]
            values = compute([p for _, p, _ in chunk], None if all(c is None for c in row_crs) else row_crs)
            for (item_id, _, k), value in zip(chunk, values):
                stores[k].put(item_id, value)
            bar.update(len(chunk))
    return [{i: store.get(i) for i, _ in items} for store in stores]
