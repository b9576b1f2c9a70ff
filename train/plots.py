"""PNG plots of a run from its CSV metrics and telemetry."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def _read_metrics(out: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(out.glob("logs/**/metrics.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                step = row.get("step")
                for key, value in row.items():
                    if key != "step" and value not in ("", None) and step not in ("", None):
                        series.setdefault(key, []).append((int(float(step)), float(value)))
    return series


def plot_run(out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    written = []
    series = _read_metrics(out)
    if series:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for key, label in (("train/lm_loss", "LM loss"), ("train/cr_loss", "CR loss")):
            if key in series:
                xs, ys = zip(*sorted(series[key]))
                ax1.plot(xs, ys, label=label)
        ax1.set_xlabel("step"), ax1.set_title("loss"), ax1.legend()
        for key, label in (("train/target_cr", "target CR"), ("train/realised_cr", "realised CR (batch)")):
            if key in series:
                xs, ys = zip(*sorted(series[key]))
                ax2.plot(xs, ys, label=label)
        ax2.set_xlabel("step"), ax2.set_title("compression ratio"), ax2.legend()
        fig.tight_layout()
        written.append(out / "loss_and_cr.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    telemetry = out / "telemetry.jsonl"
    if telemetry.exists():
        lines = telemetry.read_text().strip().splitlines()
        if lines:
            last = json.loads(lines[-1])
            grid = last["cr_per_head"]
            fig, ax = plt.subplots(figsize=(max(4, len(grid[0]) * 0.9 + 2), max(4, len(grid) * 0.22 + 1)))
            im = ax.imshow(grid, aspect="auto", cmap="viridis")
            ax.set_xlabel("KV head"), ax.set_ylabel("layer"), ax.set_title(f"realised CR at step {last['step']}")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            written.append(out / "cr_heatmap.png")
            fig.savefig(written[-1], dpi=110)
            plt.close(fig)
    return written
