"""Perplexity on held-out text, block-wise: the text is packed into blocks of ``ppl_block`` tokens (documents
joined with EOS) and every block is scored from its own start, through the model's cache. ``ppl`` reads
``--ppl-source`` (default: held-out stdlib code, the training domain); ``ppl_prose`` reads English prose that no
recipe trains on (``eval.tasks.ppl_prose``). With ``--ci-resamples`` > 0, a bootstrap 95% interval over blocks."""

from __future__ import annotations

import math
from itertools import islice

from ..store import ItemStore, digest
from . import TaskError, run_rows, sweep_name

SETTINGS = ("ppl_source", "ppl_block", "ppl_blocks")


def source_documents(text: str):
    """A callable giving the documents of ``stdlib`` (held-out stdlib files), ``prose`` (Python's reference
    manual topics, English prose) or ``files:GLOB`` (.txt/.jsonl/.json/.parquet)."""
    from dmc.data import documents, prose_documents

    if text == "prose":
        return prose_documents
    spec = source_spec(text)
    return lambda: documents(spec)


def source_spec(text: str):
    from dmc.data import SourceSpec

    if text == "stdlib":
        return SourceSpec(kind="stdlib", split="validation")
    if text.startswith("files:"):
        return SourceSpec(kind="files", path=text[len("files:"):])
    raise TaskError(f"--ppl-source {text!r}: use 'stdlib', 'prose' or 'files:GLOB'")


def run(model, opts, folder, source: str | None = None, task: str = "ppl") -> dict:
    return run_sweep(model, [(model, None)], opts, folder, source, task)[0]


def run_sweep(model, variants: list, opts, folder, source: str | None = None, task: str = "ppl") -> list[dict]:
    """The task for several variants of one loaded model at once: ``variants`` are (the variant's EvalModel view,
    its policy CR or None); one result per variant."""
    source = source or opts.ppl_source
    items = build_items(model, opts, source, task)
    stores = [ItemStore(folder, view, task, store_settings(opts, source)) for view, _ in variants]

    def compute(blocks, crs):
        scores, counts = model.block_nll(blocks, crs)
        return [{"nll": nll, "tokens": n, "counts": c, "data": digest(b)}
                for (nll, n), c, b in zip(scores, counts, blocks)]

    values = run_rows(stores, [cr for _, cr in variants], items, model.batch_size, compute,
                      f"{sweep_name(variants)} {task}")
    return [summarize(v, opts, model.kv_cr) | {"source": source} for v in values]


def build_items(model, opts, source: str, task: str) -> list[tuple[str, list[int]]]:
    """(item id, block token ids) of the task's blocks; refused in one line where the source gives too few."""
    from dmc.data import DataError, PackedBlocks

    try:
        blocks = PackedBlocks(source_documents(source), model.tok, opts.ppl_block, cycle=False)
        items = [(f"block{i}", b.tolist()) for i, (b, _) in enumerate(islice(blocks, opts.ppl_blocks))]
    except DataError as err:
        raise TaskError(f"{task}: {err}") from err
    if not items:
        raise TaskError(f"{task}: {source} gave no block of {opts.ppl_block} tokens; use a shorter --ppl-block")
    if opts.ci_resamples:  # before any model runs
        from ..intervals import require_samples

        try:
            require_samples(len(items), "blocks", f"{source} gave {len(items)} of {opts.ppl_block} tokens; use "
                            "--ppl-blocks 2 or more")
        except TaskError as err:
            raise TaskError(f"{task}: {err}") from None
    return items


def store_settings(opts, source: str) -> dict:
    """The settings an item store of this task is keyed by."""
    return {k: getattr(opts, k) for k in SETTINGS} | {"ppl_source": source}


def item_ids(opts) -> list[str]:
    return [f"block{i}" for i in range(opts.ppl_blocks)]


def summarize(values: dict[str, dict], opts, fixed_cr: float = 1.0) -> dict:
    """The task's result from its items alone (a finished run, or committed items with no model present)."""
    from ..lm import CRMeter

    meter = CRMeter(fixed_cr)
    for v in values.values():
        meter.add(v["counts"])
    nll = [v["nll"] for v in values.values()]
    tokens = [v["tokens"] for v in values.values()]
    result = {"perplexity": math.exp(sum(nll) / sum(tokens)), "tokens": sum(tokens), "blocks": len(values)}
    if opts.ci_resamples:
        from ..intervals import perplexity_interval

        result["perplexity_ci95"] = perplexity_interval(nll, tokens, resamples=opts.ci_resamples, seed=opts.seed)
    return result | meter.summary()
