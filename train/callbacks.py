"""Callbacks: atomic keep-last-K checkpoints, telemetry (throughput, LR, CR per layer x head), plots."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import lightning as L

import dmc


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        trainer.save_checkpoint(str(tmp))  # every rank takes part (DeepSpeed writes shards)
        trainer.strategy.barrier("ckpt-written")
        if trainer.is_global_zero:
            if final.exists():
                shutil.rmtree(final) if final.is_dir() else final.unlink()
            os.replace(tmp, final)
            _atomic_write_text(self.dir / "latest", final.name)
            for old in sorted(self.dir.glob("step-*.ckpt"))[: -self.keep_last]:
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        trainer.strategy.barrier("ckpt-done")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and not trainer.fit_loop._should_accumulate():
            self._save(trainer)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer)


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
        pl_module.log_dict(metrics, on_step=True)
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
