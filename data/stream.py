"""A streamed Hugging Face dataset at scale: each rank (and each DataLoader worker) reads only its own shards,
documents are shuffled in chunks, tokenised a chunk at a time and packed into blocks, and a resumed run
restarts the stream from its saved ``datasets`` state instead of re-reading what it already trained on.

One stream = one (rank, logical worker): ``split_dataset_by_node(ds, rank * workers + worker, world * workers)``.
It is read with ``IterableDataset.iter(batch_size=chunk)``, one chunk of ``chunk`` raw documents at a time, and
``IterableDataset.state_dict()`` after a chunk is the state at which the next chunk starts. Each block carries a
:class:`StreamPosition`: that chunk-start state, how many of the chunk's (permuted) documents are consumed, and
the leftover tokens. Resuming loads the state, reads that one chunk again, permutes it with the same seed and
skips the consumed documents: at most one chunk is re-read whatever the step, and the blocks are exactly the
uninterrupted run's.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import torch

from .sources import DataError, SourceSpec, keep_document, open_stream, split_lines


@dataclass
class StreamPosition:
    stream: dict | None = None  # datasets state at the start of the current chunk (None: the stream's start)
    docs: int = 0  # raw documents of this stream before the current chunk (seeds the chunk's permutation)
    taken: int = 0  # documents of the current chunk (after the hold-out filter and permutation) consumed
    leftover: list[int] = field(default_factory=list)
    epoch: int = 0
    blocks: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> StreamPosition:
        return cls(**d) if d else cls()


def _seed(seed: int, stream: int, epoch: int, docs: int) -> int:
    return int(hashlib.sha256(f"{seed}:{stream}:{epoch}:{docs}".encode()).hexdigest()[:12], 16)


class StreamedBlocks:
    """Iterable of ``(block (block_len,) int64, StreamPosition)`` for one (rank, worker) stream.

    chunk: raw documents read, shuffled and tokenised together (the shuffle buffer); shuffle=False keeps order.
    ``spec.holdout`` picks the side of the validation hold-out the stream serves (see ``SourceSpec``).
    """

    def __init__(self, spec: SourceSpec, tokenizer, block_len: int, stream: int = 0, streams: int = 1,
                 start: StreamPosition | None = None, chunk: int = 1000, shuffle: bool = True, seed: int = 0,
                 stats: Counter | None = None, max_doc_chars: int = 1_000_000):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; packing needs one between documents")
        self.spec, self.tokenizer, self.block_len = spec, tokenizer, block_len
        self.stream, self.streams = stream, streams
        self.start = start or StreamPosition()
        self.chunk, self.shuffle, self.seed = max(1, chunk), shuffle, seed
        self.stats = Counter() if stats is None else stats
        self.max_doc_chars = max_doc_chars

    def _documents(self, texts: list) -> list[str]:
        return [t for t in texts if keep_document(t if isinstance(t, str) else None, self.stats, self.spec)]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """One batched tokenizer call for a chunk; a huge document goes in as pieces cut at line ends."""
        pieces, owner = [], []
        for i, text in enumerate(texts):
            parts = [text] if len(text) <= self.max_doc_chars else split_lines(text, self.max_doc_chars)
            self.stats["split_huge"] += len(parts) > 1
            pieces += parts
            owner += [i] * len(parts)
        out: list[list[int]] = [[] for _ in texts]
        if pieces:
            for i, ids in zip(owner, self.tokenizer(pieces, add_special_tokens=False)["input_ids"]):
                out[i] += ids
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, StreamPosition]]:
        eos, field_ = self.tokenizer.eos_token_id, self.spec.text_field
        pos = StreamPosition.from_dict(self.start.to_dict())
        buf, n_block = list(pos.leftover), pos.blocks
        while True:
            ds = open_stream(self.spec, self.stream, self.streams)
            if pos.stream is not None:
                ds.load_state_dict(pos.stream)
            chunk_state, docs, skip, fresh = pos.stream, pos.docs, pos.taken, True
            for batch in ds.iter(batch_size=self.chunk):
                if field_ not in batch:
                    raise DataError(f"HF dataset {self.spec.path!r} has no column {field_!r} "
                                    f"(columns: {sorted(batch)}); set data.text_field")
                fresh = False
                texts = self._documents(batch[field_])
                if self.shuffle:
                    random.Random(_seed(self.seed, self.stream, pos.epoch, docs)).shuffle(texts)
                for j, tokens in enumerate(self._tokenize(texts[skip:]), start=skip):
                    buf += tokens + [eos]
                    while len(buf) >= self.block_len:
                        block, buf = buf[: self.block_len], buf[self.block_len:]
                        n_block += 1
                        yield torch.tensor(block, dtype=torch.long), StreamPosition(
                            chunk_state, docs, j + 1, list(buf), pos.epoch, n_block)
                chunk_state, docs, skip = ds.state_dict(), docs + len(batch[field_]), 0
            if fresh and pos.stream is None:
                raise DataError(f"HF dataset {self.spec.path!r} gave stream {self.stream} of {self.streams} no "
                                "documents; use fewer ranks or DataLoader workers than it has shards")
            pos = StreamPosition(None, 0, 0, buf, pos.epoch + 1, n_block)  # next epoch: the stream again
