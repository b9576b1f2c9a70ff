"""Lightning data module over ``data.PackedBlocks``: rank-sharded, deterministic, resumable."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset
from transformers import AutoTokenizer

from data import PackedBlocks, Position, SourceSpec, documents

from .recipe import DataSection


class _Stream(IterableDataset):
    def __init__(self, blocks: PackedBlocks):
        self.blocks = blocks

    def __iter__(self):
        return iter(self.blocks)


def _collate(items):
    return {"input_ids": torch.stack([b for b, _ in items]), "position": items[-1][1].to_dict()}


class BlocksDataModule(L.LightningDataModule):
    def __init__(self, section: DataSection, tokenizer_path: str):
        super().__init__()
        self.section, self.tokenizer_path = section, tokenizer_path
        self.position = Position()  # where the next training block comes from (restored on resume)
        self.stats: Counter = Counter()
        self.tokenizer = None

    def _spec(self, split: str) -> SourceSpec:
        s = self.section
        return SourceSpec(kind=s.kind, path=s.path, split=split, text_field=s.text_field, name=s.name,
                          validation_fraction=s.validation_fraction, piece_chars=s.piece_chars)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        next(iter(documents(self._spec(self.section.train_split))), None)  # fail fast on a bad source

    def _rank_world(self):
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self):
        rank, world = self._rank_world()
        spec = self._spec(self.section.train_split)
        blocks = PackedBlocks(lambda: documents(spec, self.stats), self.tokenizer, self.section.block_len,
                              rank=rank, world_size=world, start=self.position, stats=self.stats, cycle=True)
        return DataLoader(_Stream(blocks), batch_size=self.section.batch_size, collate_fn=_collate)

    def validation_blocks(self) -> torch.Tensor:
        """The first ``validation_blocks`` blocks of the held-out split (the same on every rank)."""
        spec = self._spec(self.section.validation_split)
        blocks = PackedBlocks(lambda: documents(spec), self.tokenizer, self.section.block_len)
        out = [b for b, _ in islice(blocks, self.section.validation_blocks)]
        return torch.stack(out) if out else torch.empty(0, self.section.block_len, dtype=torch.long)

    def state_dict(self) -> dict:
        return {"position": self.position.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.position = Position.from_dict(state.get("position"))
