"""Callbacks: atomic keep-last-K checkpoints, telemetry (throughput, LR, CR per layer x head), plots."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import lightning as L

import dmc


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` under a temporary name and rename it over ``path``: readers see the old or the new file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def log_metrics(trainer, metrics: dict, step: int) -> None:
    """Straight to the loggers (rank 0), as a row of their own at ``step`` = optimiser steps done. Values logged
    through ``LightningModule.log`` in a batch-end hook would be merged into the training row of the step and
    repeated in later rows."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep the records of steps <= ``step`` (those after it are redone by a run resumed at ``step``); drop a
    torn last line."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def last_jsonl(path: Path) -> dict | None:
    lines = path.read_text().splitlines() if path.exists() else []
    return json.loads(lines[-1]) if lines else None


class AtomicCheckpoint(L.Callback):
    """Every ``every`` optimiser steps (and at the end) save ``ckpt/step-NNNNNNN.ckpt``.

    The checkpoint is written under a ``.tmp`` name and renamed when complete; ``ckpt/latest`` names
    the newest complete one and is itself replaced atomically, so a crash mid-save never leaves a
    broken "latest". Only the ``keep_last`` newest are kept.
    """

    def __init__(self, out_dir: str, every: int, keep_last: int):
        self.dir = Path(out_dir) / "ckpt"
        self.every, self.keep_last = every, keep_last
        self._last_saved = -1

    @staticmethod
    def latest(out_dir: str) -> str | None:
        pointer = Path(out_dir) / "ckpt" / "latest"
        if not pointer.exists():
            return None
        path = pointer.parent / pointer.read_text().strip()
        return str(path) if path.exists() else None

    def _save(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        if step == self._last_saved:
            return
        self._last_saved = step
        final = self.dir / f"step-{step:07d}.ckpt"
        tmp = self.dir / f"step-{step:07d}.ckpt.tmp"
        if trainer.is_global_zero:
            self.dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        trainer.strategy.barrier("ckpt-prepare")
        trainer.save_checkpoint(str(tmp), weights_only=False)  # every rank takes part (DeepSpeed writes shards)
        trainer.strategy.barrier("ckpt-written")
        if trainer.is_global_zero:
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(tmp, final)
            atomic_write_text(self.dir / "latest", final.name)
            for old in sorted(self.dir.glob("step-*.ckpt"))[: -self.keep_last]:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        trainer.strategy.barrier("ckpt-done")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and not trainer.fit_loop._should_accumulate():
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)


class Validation(L.Callback):
    """Held-out perplexity and realised CR (hard decisions, eval mode) every ``every`` optimiser steps and at
    ``last_step``, under every strategy: each rank scores its share of the blocks with the same number of forwards
    (ZeRO-3 gathers parameters collectively), and the sums are reduced. Logged as ``val/*`` and appended to
    ``validation.jsonl``. Listed before the checkpoint callback: a run killed while validating redoes it."""

    def __init__(self, out_dir: str, every: int | None, last_step: int, batch_size: int):
        self.path = Path(out_dir) / "validation.jsonl"
        self.every, self.last_step, self.batch_size = every, last_step, batch_size
        self.blocks = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        due = step == self.last_step or (self.every and step % self.every == 0)
        if trainer.fit_loop._should_accumulate() or not due:
            return
        if self.blocks is None:
            self.blocks = trainer.datamodule.validation_blocks()
        if not len(self.blocks):
            return
        from dmc.train.validation import score_sums, summarise

        rank, world = trainer.global_rank, trainer.world_size
        share = -(-len(self.blocks) // world)
        sums = score_sums(pl_module.model, self.blocks[rank::world], self.batch_size,
                          batches=-(-share // self.batch_size), filler=self.blocks[:1])
        sums = self._reduce(trainer, pl_module, sums)
        result = {"step": step, **summarise(sums, pl_module.model.config)}
        log_metrics(trainer, {"val/perplexity": result["perplexity"], "val/realised_cr": result["cr"]}, step)
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps(result) + "\n")

    @staticmethod
    def _reduce(trainer, pl_module, sums: dict) -> dict:
        if trainer.world_size == 1:
            return sums
        import torch

        merges = sums["merges"]
        flat = torch.tensor([sums["nll"], sums["count"], sums["tokens"]], dtype=torch.float64)
        if merges is not None:
            flat = torch.cat([flat, merges.flatten()])
        flat = trainer.strategy.reduce(flat.to(pl_module.device), reduce_op="sum").cpu()
        return {"nll": float(flat[0]), "count": int(flat[1]), "tokens": int(flat[2]),
                "merges": None if merges is None else flat[3:].view_as(merges)}


class Telemetry(L.Callback):
    """Every ``every`` steps: tokens/s and LR to the loggers; realised CR per layer and per layer x KV head
    to ``telemetry.jsonl`` (and to the loggers as ``cr_layer/NN``)."""

    def __init__(self, out_dir: str, every: int):
        self.path = Path(out_dir) / "telemetry.jsonl"
        self.every = every
        self._t, self._tokens = None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t is None:
            self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._tokens += batch["input_ids"].numel() * trainer.world_size
        step = trainer.global_step
        if step % self.every or trainer.fit_loop._should_accumulate():
            return
        now = time.perf_counter()
        tps = self._tokens / max(now - self._t, 1e-9)
        self._t, self._tokens = now, 0
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        metrics = {"train/tokens_per_s": tps, "train/lr": lr}
        record = {"step": step, "tokens_per_s": tps, "lr": lr}
        if pl_module.last_stats:  # DMC runs (a GQA run's CR is fixed by its head count)
            cr = dmc.cr_from_merges(**pl_module.last_stats)
            metrics.update({f"cr_layer/{i:02d}": float(v) for i, v in enumerate(cr["per_layer"])})
            record.update(cr_per_layer=cr["per_layer"].tolist(), cr_per_head=cr["per_head"].tolist())
        log_metrics(trainer, metrics, step)
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


class Plots(L.Callback):
    """At the end of training: loss and CR versus step, and a heat map of realised CR per layer x head."""

    def __init__(self, out_dir: str):
        self.out = Path(out_dir)

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            from .plots import plot_run

            plot_run(self.out)
