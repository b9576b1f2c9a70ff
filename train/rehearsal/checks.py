"""What the rehearsal reads back from its runs: losses per step, stages, the handover rows, validation, the
W&B run, the checkpoint folder after a kill."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path


class CheckFailed(Exception):
    """A rehearsal check did not hold; the message is the table's one-line reason."""


def metric(run: Path, key: str) -> dict[int, float]:
    """step -> value of ``key`` in the run's CSV log (the last row of a step wins)."""
    from dmc.train.plots import read_metrics

    return dict(read_metrics(run).get(key, []))


def same_curve(a: Path, b: Path, steps: int, rel: float) -> str:
    la, lb = metric(a, "train/lm_loss"), metric(b, "train/lm_loss")
    missing = [s for s in range(steps) if s not in la or s not in lb]
    if missing:
        raise CheckFailed(f"steps {missing[:5]} missing from a loss curve")
    worst = max(abs(la[s] - lb[s]) / max(abs(la[s]), 1e-12) for s in range(steps))
    if worst > rel:
        raise CheckFailed(f"loss curves differ after the resume: max relative difference {worst:.2e} > {rel:g}")
    return f"{steps} steps, max relative difference {worst:.1e}"


def stages_crossed(run: Path, expected: int = 3) -> str:
    stages = sorted({int(v) for v in metric(run, "train/stage").values()})
    if stages and len(stages) < expected:
        raise CheckFailed(f"only stages {stages} ran")
    cr = metric(run, "train/target_cr")
    low, high = min(cr.values(), default=1), max(cr.values(), default=1)
    return f"stages {stages or '(GQA: one)'}; target CR {low:g} -> {high:g}"


def handover_rows(run: Path, step: int, lr: float, decision_lr: float | None, betas) -> str:
    """The decision rows one step after the handover are within one fresh Adam step of zero (see handover.py)."""
    from dmc import DMCLlamaConfig
    from dmc.train.export import load_checkpoint, recorded_config
    from dmc.train.handover import first_adam_step

    ckpt = run / "ckpt" / f"step-{step:07d}.ckpt"
    if not ckpt.exists():
        raise CheckFailed(f"{ckpt.name} is gone (keep_last too small for the check)")
    with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed's consolidation prints its progress
        state, info = load_checkpoint(ckpt)
    config = recorded_config(info, DMCLlamaConfig)
    head_dim, c = config.dmc_head_dim, config.dmc_channel_index
    worst, bound = 0.0, first_adam_step(lr, step, betas)
    for key, value in state.items():
        if key.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            worst = max(worst, float(value.detach()[c::head_dim].abs().max()) / bound)
        elif key.endswith("decision_adapter") and decision_lr:
            worst = max(worst, float(value.detach().abs().max()) / first_adam_step(decision_lr, step, betas))
    if worst > 1 + 1e-4:
        raise CheckFailed(f"decision rows at step {step} are {worst:.3g}x one fresh Adam step from zero: the handover "
                          "did not reach the optimizer")
    return f"rows at step {step} within one fresh Adam step of 0 ({worst:.2f} of it)"


def validation(run: Path) -> str:
    summary = json.loads((run / "summary.json").read_text())
    v = summary.get("validation")
    if not v:
        raise CheckFailed("summary.json has no validation")
    return f"held-out ppl {v['perplexity']:.4g}, realised CR {v['cr']:.3f} at step {v['step']} ({v['tokens']} tokens)"


def one_wandb_run(run: Path) -> str:
    run_id = (run / "wandb_id").read_text().strip() if (run / "wandb_id").exists() else None
    offline = [p.name for p in (run / "wandb").glob("offline-run-*")] if run_id else []
    if not run_id or not offline or not all(name.endswith(run_id) for name in offline):
        raise CheckFailed(f"W&B runs {offline} do not all carry the run folder's id {run_id}")
    versions = sorted(p.name for p in (run / "logs").iterdir())
    if versions != ["version_0"]:
        raise CheckFailed(f"CSV logs in {versions}, not one version")
    return f"one W&B run ({run_id}) and one CSV version across the resume"


def intact_after_kill(run: Path, total: int) -> int:
    """The step a killed run resumes from: its ckpt/latest names a complete checkpoint of stage 2."""
    from dmc.train.callbacks import AtomicCheckpoint
    from dmc.train.loggers import checkpoint_step

    latest = AtomicCheckpoint.latest(str(run))
    if latest is None:
        raise CheckFailed("no complete checkpoint after the kill")
    step = checkpoint_step(latest)
    if step >= total:
        raise CheckFailed("the run finished before the kill landed")
    return step
