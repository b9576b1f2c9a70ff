"""PNG plots of a run from its CSV metrics and telemetry."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def read_metrics(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run's CSV logs: key -> [(step, value), ...] in file order."""
    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(out.glob("logs/**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                for key, value in row.items():
                    if key != "step" and value not in ("", None) and step not in ("", None):
                        series.setdefault(key, []).append((int(float(step)), float(value)))
    return series


HEATMAP_RECORDS = 10


def _moving_mean(ys, window: int = 9) -> list[float]:
    half = window // 2
    return [sum(ys[max(0, i - half): i + half + 1]) / len(ys[max(0, i - half): i + half + 1]) for i in range(len(ys))]


def plot_run(out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    written = []
    series = read_metrics(out)
    if series:
        validated = len(series.get("val/perplexity", [])) >= 2  # a single end-of-run point reads badly as a plot
        fig, axes = plt.subplots(1, 3 if validated else 2, figsize=(16 if validated else 11, 4))
        ax1, ax2 = axes[:2]
        for key, label in (("train/lm_loss", "LM loss"), ("train/cr_loss", "CR loss"), ("train/kl_loss", "distillation KL")):
            if key in series:
                xs, ys = zip(*sorted(series[key]))
                line, = ax1.plot(xs, ys, alpha=0.3, linewidth=0.8)
                ax1.plot(xs, _moving_mean(ys), color=line.get_color(), label=f"{label} (moving mean)")
        ax1.set_xlabel("step"), ax1.set_title("loss"), ax1.legend()
        for key, label in (("train/target_cr", "target CR"), ("train/realised_cr", "realised CR (batch)")):
            if key in series:
                xs, ys = zip(*sorted(series[key]))
                ax2.plot(xs, ys, label=label)
        if "val/realised_cr" in series:
            xs, ys = zip(*sorted(series["val/realised_cr"]))
            ax2.plot(xs, ys, "o-", label="realised CR (held-out, hard decisions)")
        ax2.set_xlabel("step"), ax2.set_title("compression ratio"), ax2.legend()
        if validated:
            xs, ys = zip(*sorted(series["val/perplexity"]))
            axes[2].plot(xs, ys, "o-")
            axes[2].set_xlabel("step"), axes[2].set_title("held-out perplexity")
        fig.tight_layout()
        written.append(out / "loss_and_cr.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    telemetry = out / "telemetry.jsonl"
    if telemetry.exists():
        lines = telemetry.read_text().strip().splitlines()
        # One batch is noisy: average the merge fraction of the last records, report it as a CR.
        recent = [r for r in map(json.loads, lines[-HEATMAP_RECORDS:]) if "cr_per_head" in r]  # GQA runs: none
        if recent:
            last = recent[-1]
            merged = [[sum(1 - 1 / r["cr_per_head"][i][j] for r in recent) / len(recent)
                       for j in range(len(last["cr_per_head"][0]))] for i in range(len(last["cr_per_head"]))]
            grid = [[1 / max(1 - m, 1e-9) for m in row] for row in merged]
            fig, ax = plt.subplots(figsize=(max(4, len(grid[0]) * 0.9 + 2), max(4, len(grid) * 0.22 + 1)))
            from matplotlib.colors import LogNorm

            # log colours: a few heads merging nearly everything would otherwise flatten the rest
            im = ax.imshow(grid, aspect="auto", cmap="viridis", norm=LogNorm(vmin=1, vmax=max(2, max(map(max, grid)))))
            for i, row in enumerate(grid):
                for j, value in enumerate(row):
                    ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=6, color="w")
            ax.set_xlabel("KV head"), ax.set_ylabel("layer"), ax.set_title(f"realised CR, steps {recent[0]['step']}-{last['step']}")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            written.append(out / "cr_heatmap.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written
