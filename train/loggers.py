"""The run's loggers: one CSV, one TensorBoard version and one W&B run across every resume of a run folder.

A resumed run starts again at its checkpoint's step, so whatever a killed run logged after that checkpoint is
dropped from the CSV (TensorBoard: ``purge_step``) and logged again by the steps that redo it: the history
reads as one uninterrupted run.
"""

from __future__ import annotations

import csv
import os
import re
import uuid
import warnings
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

from .callbacks import atomic_write_text

WANDB_ID_FILE = "wandb_id"


def checkpoint_step(ckpt: str | None) -> int:
    """The step a checkpoint resumes at, from its name ``step-NNNNNNN.ckpt`` (0: a fresh start)."""
    if ckpt is None:
        return 0
    found = re.search(r"step-(\d+)", Path(ckpt).name)
    return int(found.group(1)) if found else 0


def rows_before(path: Path, step: int) -> list[dict]:
    """The rows a run resumed at ``step`` keeps: training rows of step indices < ``step`` (0-based: the steps its
    checkpoint holds) and the other rows (validation, telemetry: logged at steps done) up to ``step``."""
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("step")]
    return [row for row in rows
            if int(row["step"]) < step or (int(row["step"]) == step and not row.get("train/lm_loss"))]


class RunCSVLogger(CSVLogger):
    """``RUN/logs/version_0/metrics.csv`` for the whole run; a resume keeps the rows before its step."""

    def __init__(self, out_dir: str, resume_step: int):
        super().__init__(out_dir, name="logs", version=0)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            metrics = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
            kept = rows_before(metrics, self.resume_step)
            with warnings.catch_warnings():  # "previous log files will be deleted": we keep them, below
                warnings.filterwarnings("ignore", message="Experiment logs directory")
                self._experiment = ExperimentWriter(log_dir=self.log_dir)  # removes the old file
            if kept:
                keys = sorted({k for row in kept for k in row})
                tmp = metrics.with_name(metrics.name + ".tmp")
                with open(tmp, "w", newline="") as f:
                    writer = csv.DictWriter(f, fieldnames=keys)
                    writer.writeheader()
                    writer.writerows(kept)
                os.replace(tmp, metrics)
                self._experiment.metrics_keys = keys
        return self._experiment


def wandb_run_id(out_dir: Path, is_global_zero: bool) -> str:
    """The run folder's W&B id, created on the first start and kept in ``RUN/wandb_id``."""
    path = out_dir / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    if is_global_zero:  # only rank 0 logs to W&B; other ranks never use their id
        atomic_write_text(path, run_id + "\n")
    return run_id


def build_loggers(run, out_dir: Path, resume_step: int, is_global_zero: bool) -> list:
    loggers = [RunCSVLogger(str(out_dir), resume_step)]
    if "wandb" in run.loggers:
        from lightning.pytorch.loggers import WandbLogger

        loggers.append(WandbLogger(project=run.wandb_project, entity=run.wandb_entity, save_dir=str(out_dir),
                                   name=out_dir.name, id=wandb_run_id(out_dir, is_global_zero), resume="allow"))
    if "tensorboard" in run.loggers:
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(out_dir), name="tb", version=0, purge_step=resume_step or None))
    return loggers
