"""Perplexity on held-out text, block-wise: the text is packed into blocks of ``ppl_block`` tokens (documents
joined with EOS) and every block is scored from its own start, through the model's cache."""

from __future__ import annotations

import math
from itertools import islice

from ..store import ItemStore
from . import TaskError, run_items

SETTINGS = ("ppl_source", "ppl_block", "ppl_blocks")


def source_spec(text: str):
    """``stdlib`` (held-out stdlib files) or ``files:GLOB`` (.txt/.jsonl/.json/.parquet)."""
    from data import SourceSpec

    if text == "stdlib":
        return SourceSpec(kind="stdlib", split="validation")
    if text.startswith("files:"):
        return SourceSpec(kind="files", path=text[len("files:"):])
    raise TaskError(f"--ppl-source {text!r}: use 'stdlib' or 'files:GLOB'")


def run(model, opts, folder) -> dict:
    from data import DataError, PackedBlocks, documents

    spec = source_spec(opts.ppl_source)
    try:
        blocks = PackedBlocks(lambda: documents(spec), model.tok, opts.ppl_block, cycle=False)
        items = [(f"block{i}", b.tolist()) for i, (b, _) in enumerate(islice(blocks, opts.ppl_blocks))]
    except DataError as err:
        raise TaskError(f"ppl: {err}") from err
    if not items:
        raise TaskError(f"ppl: {opts.ppl_source} gave no block of {opts.ppl_block} tokens; use a shorter --ppl-block")
    store = ItemStore(folder, model.name, "ppl", {k: getattr(opts, k) for k in SETTINGS})

    def compute(blocks):
        scores, counts = model.block_nll(blocks)
        return [{"nll": nll, "tokens": n, "counts": c} for (nll, n), c in zip(scores, counts)]

    values = run_items(store, items, model.batch_size, compute, f"{model.name} ppl")
    meter = model.cr_meter()
    for v in values.values():
        meter.add(v["counts"])
    nll = sum(v["nll"] for v in values.values())
    tokens = sum(v["tokens"] for v in values.values())
    return {"perplexity": math.exp(nll / tokens), "tokens": tokens, "blocks": len(values), **meter.summary()}
