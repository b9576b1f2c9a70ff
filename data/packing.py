"""Tokenise documents and pack them into fixed-length blocks, EOS between documents.

The stream is deterministic and resumable: every block comes with the ``Position`` just after it
(next document to read, the leftover tokens, the block counter), so a run restarted from a saved
position continues exactly where it stopped, with no block seen twice or skipped. Ranks share one
global order: block ``i`` goes to rank ``i % world_size``, and a rank reports the position at the end
of each row of ``world_size`` blocks, the same on every rank.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice

import torch

from .sources import split_lines


@dataclass
class Position:
    next_doc: int = 0
    leftover: list[int] = field(default_factory=list)
    blocks: int = 0
    epoch: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Position:
        return cls(**d) if d else cls()


class PackedBlocks:
    """Iterable of ``(block (block_len,) int64, Position)`` for one rank.

    documents: a zero-argument callable returning a fresh deterministic iterator of (doc_id, text).
    max_doc_chars: documents longer than this are tokenised in pieces (cut at line ends), so a huge
      document never has to fit the tokenizer at once.
    """

    def __init__(self, documents: Callable[[], Iterator[tuple[str, str]]], tokenizer, block_len: int,
                 rank: int = 0, world_size: int = 1, start: Position | None = None,
                 max_doc_chars: int = 1_000_000, stats: Counter | None = None, cycle: bool = False):
        if block_len < 2:
            raise ValueError(f"block_len={block_len} must be >= 2")
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id; packing needs one between documents")
        self.documents, self.tokenizer, self.block_len = documents, tokenizer, block_len
        self.rank, self.world_size = rank, world_size
        self.start = start or Position()
        self.max_doc_chars = max_doc_chars
        self.stats = Counter() if stats is None else stats
        self.cycle = cycle  # restart the corpus (epoch + 1) when it runs out, instead of stopping

    def _tokens(self, text: str) -> list[int]:
        if len(text) <= self.max_doc_chars:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        self.stats["split_huge"] += 1
        return [i for piece in split_lines(text, self.max_doc_chars)
                for i in self.tokenizer(piece, add_special_tokens=False)["input_ids"]]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Position]]:
        eos = self.tokenizer.eos_token_id
        buf = list(self.start.leftover)
        n_doc, n_block, epoch = self.start.next_doc, self.start.blocks, self.start.epoch
        mine: torch.Tensor | None = None
        while True:
            fresh = True
            for _, text in islice(self.documents(), n_doc, None):
                fresh = False
                buf += self._tokens(text) + [eos]
                n_doc += 1
                while len(buf) >= self.block_len:
                    block, buf = buf[: self.block_len], buf[self.block_len :]
                    if n_block % self.world_size == self.rank:
                        mine = torch.tensor(block, dtype=torch.long)
                    n_block += 1
                    if n_block % self.world_size == 0:  # end of a row: the same position on every rank
                        yield mine, Position(n_doc, list(buf), n_block, epoch)
                        mine = None
            if not self.cycle or (fresh and n_doc == 0):
                return
            n_doc, epoch = 0, epoch + 1
