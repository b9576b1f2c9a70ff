"""A tokens curve (a protocol of ``kind: curve``, e.g. ``dmc compare --protocol curve-135m``): one recipe trained at
1x, 2x, 4x, 8x its schedule's length, each beside its control trained at the same tokens, and each point's
perplexity over its control's on the same blocks with a paired interval, against the tokens trained on.

A point differs from its base recipe in the length of its schedule only: every stage (stage 1, the ramp, the hold
and the attention transfer) times the scale. A run folder in the run cache whose recorded recipe differs in anything
else is refused (it would put another recipe's model on the curve).
"""

from __future__ import annotations

from pathlib import Path

from .tasks import TaskError

LENGTHS = ("stage1_steps", "ramp_steps", "finetune_steps", "transfer_steps")  # the schedule fields a scale multiplies


def _recipe(recipe: str, base: str, *extra: str):
    from dmc.train.run import RecipeError, parse

    try:
        return parse(["--config", recipe, "--model.path", base, *extra])[0]
    except RecipeError as err:
        raise TaskError(f"recipe {recipe!r}: {err}") from None


def _scaled(recipe: str, base: str, scale: int):
    """``recipe`` (from ``base``) with every stage of its schedule times ``scale``."""
    import dataclasses

    if not isinstance(scale, int) or scale < 1:
        raise TaskError(f"a curve's scale must be a whole number >= 1, not {scale!r}")
    r = _recipe(recipe, base)
    return dataclasses.replace(r, schedule=dataclasses.replace(
        r.schedule, **{name: getattr(r.schedule, name) * scale for name in LENGTHS}))


def scaled_lengths(recipe: str, base: str, scale: int) -> list[str]:
    """``dmc train`` options that multiply every stage of ``recipe``'s schedule by ``scale``."""
    schedule = _scaled(recipe, base, scale).schedule
    return [arg for name in LENGTHS for arg in (f"--schedule.{name}", str(getattr(schedule, name)))]


def training_tokens(recipe: str, base: str, scale: int) -> int:
    """Tokens a run of ``recipe`` at ``scale`` trains on: steps x sequences per step x block length (one process)."""
    r = _scaled(recipe, base, scale)
    return r.total_steps * r.data.batch_size * r.optim.accumulate_grad_batches * r.data.block_len


def check_length_only(run_dir: Path, recipe: str, base: str, scale: int) -> None:
    """Refuse, in one line, a run folder whose recorded recipe is not ``recipe`` at ``scale``: it differs from the
    base recipe in more than the schedule's length."""
    import yaml

    from dmc.train.run import recipe_changes

    recorded = Path(run_dir) / "config.yaml"
    if not recorded.is_file():
        return
    want = _scaled(recipe, base, scale).to_dict()
    changes = recipe_changes(want, yaml.safe_load(recorded.read_text()) or {})
    if changes:
        raise TaskError(f"{run_dir} holds a run that differs from {recipe} at {scale}x in more than its schedule's "
                        f"length ({'; '.join(changes[:2])}): a curve's points differ in length only; move the folder "
                        "away to train this point afresh")


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
