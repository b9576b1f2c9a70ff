"""A tokens curve (a protocol of ``kind: curve``, e.g. ``dmc compare --protocol curve-135m``): one recipe trained at
1x, 2x, 4x, 8x its schedule's length, each beside its control trained at the same tokens, and each point's
perplexity over its control's on the same blocks with a paired interval, against the tokens trained on.

A point differs from its base recipe in the length of its schedule only: every stage (stage 1, the ramp, the hold
and the attention transfer) times the scale. A run folder in the run cache whose recorded recipe differs in anything
else is refused (it would put another recipe's model on the curve).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

from .tasks import TaskError


def plan(recipe: str, base: str, scale: int, run_dir: str | None = None) -> dict:
    """``dmc train --plan`` of ``recipe`` from ``base`` at ``scale`` (every stage of its schedule times it): the
    resolved recipe, its steps and tokens. Asked of the ``dmc`` command (eval never imports train); with ``run_dir``,
    a folder holding a run that differs in more than the length is refused in one line."""
    command = [sys.executable, "-m", "dmc.cli", "train", "--config", recipe, "--model.path", base,
               "--scale", str(scale), "--plan"] + (["--run.out_dir", run_dir] if run_dir else [])
    done = subprocess.run(command, capture_output=True, text=True)
    where = f" in {run_dir}" if run_dir else ""
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1].removeprefix("dmc train: error: ")
        if "holds a run of another recipe" in why:  # dmc train's own advice (--resume none) is not this command's
            why = "it holds a run of another recipe" + why.split("holds a run of another recipe", 1)[1].split("; use")[0]
            why += "; a curve's points differ in length only: move the folder away to train this point afresh"
        raise TaskError(f"the curve's point {recipe} at {scale}x{where}: {why}")
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        raise TaskError(f"the curve's point {recipe} at {scale}x: dmc train --plan printed no plan "
                        f"({done.stdout.strip()[:200]!r})") from None


@cache  # a recipe's tokens do not change while a protocol runs; each plan is a process of its own (seconds)
def training_tokens(recipe: str, base: str, scale: int) -> int:
    """Tokens a run of ``recipe`` at ``scale`` trains on (one process)."""
    return plan(recipe, base, scale)["tokens"]


def check_length_only(run_dir: Path, recipe: str, base: str, scale: int) -> None:
    """Refuse, in one line, a run folder whose recorded recipe is not ``recipe`` at ``scale``."""
    plan(recipe, base, scale, str(run_dir))


def curve_rows(protocol, results: dict) -> list[dict]:
    """One row per (training with its own control, perplexity task): its scale, tokens, realised CR and the paired
    ratio to its control, from the assembled ``results``."""
    rows = []
    for t in protocol.trainings:
        if t.control is None:
            continue
        a, b = t.export, protocol.training(t.control).export
        tokens = training_tokens(t.recipe, protocol.base, t.scale)
        for p in results["paired"]:
            if p["a"] == a and p["b"] == b and p["task"] in ("ppl", "ppl_prose"):
                cr = results["models"][a]["tasks"][p["task"]].get("realised_cr")
                rows.append({"recipe": Path(t.recipe).name.removesuffix(".yaml"), "model": a, "control": b,
                             "scale": t.scale, "tokens": tokens, "task": p["task"], "realised_cr": cr,
                             "ratio": p["ratio"], "ci95": p["ci95"], "verdict": p["verdict"]})
    return rows


def curve_plot(results: dict, out: Path) -> list[str]:
    """curve_ppl_ratio.png: each recipe's perplexity over its control's (code, prose) against training tokens, with
    the paired 95% intervals."""
    rows = results.get("curve") or []
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("ppl", "ppl_prose") if any(r["task"] == t for r in rows)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for recipe in dict.fromkeys(r["recipe"] for r in rows):
            pts = sorted((r for r in rows if r["recipe"] == recipe and r["task"] == task), key=lambda r: r["tokens"])
            x = [r["tokens"] for r in pts]
            y = [r["ratio"] for r in pts]
            err = [[r["ratio"] - r["ci95"][0] for r in pts], [r["ci95"][1] - r["ratio"] for r in pts]]
            ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=recipe)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set(xlabel="training tokens", ylabel="perplexity / its control's (paired 95% CI)",
               title={"ppl": "code (the training domain)", "ppl_prose": "English prose (never trained on)"}[task])
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curve_ppl_ratio.png", dpi=120)
    plt.close(fig)
    return ["curve_ppl_ratio.png"]


def curve_lines(results: dict) -> list[str]:
    """The report's curve table."""
    rows = results.get("curve") or []
    if not rows:
        return []
    label = {"ppl": "code", "ppl_prose": "prose"}
    lines = ["## Perplexity over the control's against training tokens\n",
             "| recipe | scale | tokens | realised CR | task | ratio [paired 95% CI] | verdict |",
             "|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        cr = f"{r['realised_cr']:.2f}" if r["realised_cr"] is not None else "–"
        lines.append(f"| {r['recipe']} | {r['scale']}x | {r['tokens']:,} | {cr} | {label[r['task']]} | "
                     f"{r['ratio']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['verdict']} |")
    return lines + [""]
