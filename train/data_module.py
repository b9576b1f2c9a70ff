"""Lightning data module: training blocks (rank-sharded, resumable) and the held-out validation blocks.

Local sources (stdlib, files) are packed in the training process in one global order (block i to rank
i % world) and resume exactly from one position. A streamed HF dataset is read per (rank, DataLoader worker)
from its own shards, shuffled in chunks and tokenised in the workers (``data.stream``); the checkpoint keeps
every stream's position, gathered from all ranks, and a resume restarts each stream from its saved state.
"""

from __future__ import annotations

from collections import Counter
from itertools import islice

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from transformers import AutoTokenizer

from dmc.data import DataError, PackedBlocks, Position, SourceSpec, documents
from dmc.data.stream import StreamedBlocks, StreamPosition

from .recipe import DataSection

UNSHUFFLED_CHUNK = 256  # documents tokenised per call when the stream is not shuffled


class _LocalStream(IterableDataset):
    def __init__(self, blocks: PackedBlocks):
        self.blocks = blocks

    def __iter__(self):
        for block, pos in self.blocks:
            yield block, pos.to_dict()


class _WorkerStreams(IterableDataset):
    """In DataLoader worker w: the stream of logical worker (w + rotate) % workers of this rank. The DataLoader
    takes batches from its workers in turn, so rotating by the next stream a resumed run owes restores the
    uninterrupted run's order."""

    def __init__(self, make, workers: int, rotate: int):
        self.make, self.workers, self.rotate = make, workers, rotate

    def __iter__(self):
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.rotate) % self.workers
        for block, pos in self.make(logical):
            yield block, {"worker": logical, **pos.to_dict()}


def _collate(items):
    return {"input_ids": torch.stack([b for b, _ in items]), "position": items[-1][1]}


class BlocksDataModule(L.LightningDataModule):
    def __init__(self, section: DataSection, tokenizer_path: str, seed: int = 0):
        super().__init__()
        self.section, self.tokenizer_path, self.seed = section, tokenizer_path, seed
        self.local_position: dict | None = None  # local sources: the next block's position, the same on every rank
        self.stream_positions: dict[int, dict] = {}  # streamed: logical worker -> its position on this rank
        self.next_stream = 0  # streamed: the logical worker whose batch comes next
        self.stats: Counter = Counter()
        self.tokenizer = None

    @property
    def streamed(self) -> bool:
        return self.section.kind == "hf"

    @property
    def workers(self) -> int:
        if not self.streamed:
            return 0
        return 1 if self.section.num_workers is None else self.section.num_workers

    def _spec(self, split: str, holdout: str | None) -> SourceSpec:
        s = self.section
        return SourceSpec(kind=s.kind, path=s.path, split=split, text_field=s.text_field, name=s.name,
                          validation_fraction=s.validation_fraction, piece_chars=s.piece_chars, holdout=holdout)

    def train_spec(self) -> SourceSpec:
        return self._spec(self.section.train_split, "exclude" if self.section.validation_split == "holdout" else None)

    def validation_spec(self) -> SourceSpec:
        if self.section.validation_split == "holdout":
            return self._spec(self.section.train_split, "only")
        return self._spec(self.section.validation_split, None)

    def setup(self, stage: str | None = None) -> None:
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        next(iter(documents(self.train_spec())), None)  # fail fast on a bad source

    def _rank_world(self):
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self):
        rank, world = self._rank_world()
        s = self.section
        if not self.streamed:
            spec = self.train_spec()
            blocks = PackedBlocks(lambda: documents(spec, self.stats), self.tokenizer, s.block_len, rank=rank,
                                  world_size=world, start=Position.from_dict(self.local_position), stats=self.stats,
                                  cycle=True)
            return DataLoader(_LocalStream(blocks), batch_size=s.batch_size, collate_fn=_collate)
        spec, workers = self.train_spec(), max(1, self.workers)
        shuffle = s.shuffle_buffer > 1

        def make(logical: int) -> StreamedBlocks:
            start = StreamPosition.from_dict(self.stream_positions.get(logical))
            chunk = s.shuffle_buffer if shuffle else UNSHUFFLED_CHUNK
            return StreamedBlocks(spec, self.tokenizer, s.block_len, stream=rank * workers + logical,
                                  streams=world * workers, start=start, chunk=chunk, shuffle=shuffle, seed=self.seed)

        return DataLoader(_WorkerStreams(make, workers, self.next_stream), batch_size=s.batch_size,
                          collate_fn=_collate, num_workers=self.workers)

    def consumed(self, position: dict) -> None:
        """Record the position after a training batch (called by the training step)."""
        if not self.streamed:
            self.local_position = position
            return
        position = dict(position)
        worker = position.pop("worker")
        self.stream_positions[worker] = position
        self.next_stream = (worker + 1) % max(1, self.workers)

    def first_training_blocks(self, n: int) -> torch.Tensor:
        """The first ``n`` blocks of the training documents in a fixed order (the same on every rank), for work
        before training (DMS's warm start)."""
        spec = self.train_spec()
        if self.streamed:
            blocks = StreamedBlocks(spec, self.tokenizer, self.section.block_len, stream=0, streams=1,
                                    chunk=UNSHUFFLED_CHUNK, shuffle=False, seed=self.seed)
        else:
            blocks = PackedBlocks(lambda: documents(spec), self.tokenizer, self.section.block_len)
        out = [b for b, _ in islice(blocks, n)]
        return torch.stack(out) if out else torch.empty(0, self.section.block_len, dtype=torch.long)

    def validation_blocks(self) -> torch.Tensor:
        """The first ``validation_blocks`` blocks of the held-out documents (the same on every rank)."""
        spec = self.validation_spec()
        blocks = PackedBlocks(lambda: documents(spec), self.tokenizer, self.section.block_len)
        out = [b for b, _ in islice(blocks, self.section.validation_blocks)]
        return torch.stack(out) if out else torch.empty(0, self.section.block_len, dtype=torch.long)

    # ---- checkpoint state ------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if not self.streamed:
            return {"position": self.local_position}
        rank, world = self._rank_world()
        mine = {"positions": self.stream_positions, "next": self.next_stream}
        ranks = [mine]
        if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks = [None] * world
            torch.distributed.all_gather_object(ranks, mine)  # every rank saves; rank 0's copy is written
        return {"world": world, "workers": max(1, self.workers), "ranks": ranks}

    def load_state_dict(self, state: dict) -> None:
        if not self.streamed:
            self.local_position = state.get("position")
            return
        rank, world = self._rank_world()
        if "ranks" not in state:
            raise DataError("the checkpoint's data position is not a stream's; resume with the data section it "
                            "was trained with")
        if (state["world"], state["workers"]) != (world, max(1, self.workers)):
            raise DataError(f"the checkpoint's stream was read by {state['world']} rank(s) x {state['workers']} "
                            f"DataLoader worker(s); resume with the same run.devices x run.num_nodes and "
                            f"data.num_workers (now {world} x {max(1, self.workers)})")
        mine = state["ranks"][rank]
        self.stream_positions = {int(k): v for k, v in mine["positions"].items()}
        self.next_stream = mine["next"]
