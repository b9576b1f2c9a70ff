"""Streamed-data resume: documents read, and seconds, to produce the first block after resuming at step N.

    .venv/bin/python bench/stream_resume.py [--steps 1000 10000] [--documents 24000]

A dataset of Python-stdlib pieces is published under a Hub id into a temporary HF cache and streamed offline,
as `dmc train` streams data.kind: hf. "before" is the packing that preceded data/stream.py (still used for
local sources): it re-streams every document the run had consumed and drops them. "after" is data/stream.py:
it loads the saved `datasets` state and re-reads one chunk (the shuffle buffer). One rank, one block per step.
Documents read counts what the `datasets` stream hands to our code; the seconds include datasets' own seek.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from itertools import islice
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REPO, CONFIG = "bench/stream-resume", "default"


def _counted(documents, counter: list[int]):
    for doc in documents:
        counter[0] += 1
        yield doc


def _counting_stream(open_stream, counter: list[int]):
    """data.stream's open_stream, with the documents of every chunk the stream yields counted."""
    def wrapped(*args, **kwargs):
        ds = open_stream(*args, **kwargs)
        chunks = ds.iter

        def counted_iter(batch_size, **kw):
            for batch in chunks(batch_size, **kw):
                counter[0] += len(next(iter(batch.values())))
                yield batch

        ds.iter = counted_iter
        return ds
    return wrapped


def measure(kind: str, steps: int, tokenizer, block_len: int, chunk: int) -> tuple[int, float]:
    import dmc.data.stream
    from dmc.data import PackedBlocks, documents
    from dmc.data.sources import SourceSpec
    from dmc.data.stream import StreamedBlocks

    spec = SourceSpec(kind="hf", path=REPO, name=CONFIG, split="train", holdout="exclude")
    counter = [0]
    if kind == "before":
        def make(start=None):
            return PackedBlocks(lambda: _counted(documents(spec), counter), tokenizer, block_len, start=start,
                                cycle=True)
    else:
        def make(start=None):
            return StreamedBlocks(spec, tokenizer, block_len, start=start, chunk=chunk)
    position = list(islice(make(), steps))[-1][1]  # where a checkpoint at step N leaves the stream
    counter[0] = 0
    original = dmc.data.stream.open_stream
    dmc.data.stream.open_stream = _counting_stream(original, counter)
    try:
        t0 = time.perf_counter()
        next(iter(make(position)))
        seconds = time.perf_counter() - t0
    finally:
        dmc.data.stream.open_stream = original
    return counter[0], seconds


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--documents", type=int, default=24000, help="documents in the published dataset")
    ap.add_argument("--block-len", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1000, help="shuffle buffer of the stream (data.shuffle_buffer)")
    ap.add_argument("--tokenizer", default=str(ROOT / "checkpoints" / "smollm2-135m"))
    ns = ap.parse_args(argv)
    home = tempfile.mkdtemp(prefix="dmc-stream-bench-")
    os.environ.update(HF_HOME=home, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")  # before datasets is imported
    sys.path.insert(0, str(ROOT))
    from transformers import AutoTokenizer

    from dmc.data import SourceSpec, documents
    from dmc.train.hub_cache import publish_dataset

    texts = [t for _, t in islice(documents(SourceSpec(kind="stdlib", piece_chars=1024)), ns.documents)]
    publish_dataset(texts, REPO, home, CONFIG, shards=8)
    tokenizer = AutoTokenizer.from_pretrained(ns.tokenizer)
    print(f"{len(texts)} documents, block {ns.block_len} tokens, chunk {ns.chunk}; resume at step N (one block per step)")
    print(f"{'step N':>8} {'before: docs':>13} {'s':>7} {'after: docs':>12} {'s':>7} {'docs ratio':>11}")
    for steps in ns.steps:
        before = measure("before", steps, tokenizer, ns.block_len, ns.chunk)
        after = measure("after", steps, tokenizer, ns.block_len, ns.chunk)
        print(f"{steps:>8} {before[0]:>13} {before[1]:>7.2f} {after[0]:>12} {after[1]:>7.2f} "
              f"{before[0] / max(after[0], 1):>10.1f}x")


if __name__ == "__main__":
    main()
