"""results.json, report.md and plots for one ``dmc eval`` run."""

from __future__ import annotations

import json
import os
from pathlib import Path

HEADLINE = {"ppl": "perplexity", "ppl_prose": "perplexity", "mmlu": "accuracy_micro", "humaneval": "pass@1", "needle": "accuracy"}


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def markdown(results: dict) -> str:
    models = results["models"]
    lines = ["# dmc eval report\n", f"Command: `{results['command']}`\n"]
    tasks = [t for t in results["tasks"] if t != "speed"]
    for task in tasks:
        rows = [(name, m["tasks"][task]) for name, m in models.items() if task in m["tasks"]]
        if not rows:
            continue
        keys = [k for k, v in rows[0][1].items() if isinstance(v, (int, float)) and k != "realised_cr"]
        ci = f"{HEADLINE.get(task)}_ci95"
        shown = keys + ([f"{HEADLINE[task]} 95% CI"] if any(ci in r for _, r in rows) else [])
        lines.append(f"## {task}\n")
        lines.append("| model | realised CR | KV vs 16-bit | " + " | ".join(shown) + " |")
        lines.append("|---" * (len(shown) + 3) + "|")
        for name, r in rows:
            cells = [_fmt(r.get(k)) for k in keys] + ([interval_text(r.get(ci))] if len(shown) > len(keys) else [])
            cr = r.get("realised_cr", 1.0)
            kv = models[name].get("kv_slot_shrink", 1.0) / cr
            lines.append(f"| {name} | {cr:.2f} | {kv:.3f} | " + " | ".join(cells) + " |")
        lines.append("\nKV vs 16-bit: cache bytes per token over the vanilla model's at 16 bits, from the realised CR and "
                     "the bytes of a slot (codes, scales and minima at 8/4 bits; DMC's one open slot per head not counted).")
        if len(shown) > len(keys):
            lines.append(f"\n95% CI: percentile bootstrap over {'cells' if task == 'needle' else 'blocks'} "
                         f"({results.get('settings', {}).get('ci_resamples')} resamples).")
        lines.append("")
        if task == "mmlu":
            subjects = sorted({s for _, r in rows for s in r["per_subject"]})
            lines.append("| subject | " + " | ".join(n for n, _ in rows) + " |")
            lines.append("|---" * (len(rows) + 1) + "|")
            for s in subjects:
                lines.append(f"| {s} | " + " | ".join(_fmt(r["per_subject"].get(s, float("nan"))) for _, r in rows) + " |")
            lines.append("")
    if "speed" in results["tasks"]:
        lines.append("## speed (dmc bench)\n")
        lines.append("| model | variant | context | batch | CR | KV MiB | KV ratio | decode tok/s | speed-up | ideal |")
        lines.append("|---" * 10 + "|")
        for name, m in models.items():
            for r in m["tasks"].get("speed", {}).get("rows", []):
                lines.append(f"| {name} | {r['model']} | {r['context']} | {r['batch']} | {r['realised_cr']:.2f} | "
                             f"{r['kv_bytes'] / 2**20:.1f} | {r['kv_ratio']:.3f} | {r['decode_tokens_per_s']:.1f} | "
                             f"{r['decode_speedup']:.2f} | {r['ideal_decode_speedup']:.2f} |")
        lines.append("")
    lines.append("Plots: " + ", ".join(f"`{p}`" for p in results.get("plots", [])) + "\n")
    return "\n".join(lines)


def interval_text(ci) -> str:
    return f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "–"


def family(name: str, model: dict) -> str:
    """Legend group: the policy name (on the LM-only control: "NAME (control)"), "DMC" for DMC folders, "GQA" for
    pooled ones, "control" for the LM-only control, "vanilla" otherwise."""
    on_control = model.get("role") == "control"
    bits = model.get("kv_bits", 16)
    coded = f" int{bits}" if bits < 16 else ""
    if model.get("policy") and not model["policy"].startswith("keep_all"):
        return model["policy"].split("@")[0] + coded + (" (control)" if on_control else "")
    if on_control:
        return "control" + coded
    return ("DMC" if model.get("dmc") else ("GQA" if model.get("gqa") else "vanilla")) + coded


def plots(results: dict, out: Path, per_model=None) -> list[str]:
    """The quality-vs-CR plot of each task, and per model (those ``per_model(name, entry)`` accepts, default
    all) its CR per layer and needle heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    written = []
    models = results["models"]
    for task, key in HEADLINE.items():
        pts = [(n, m["tasks"][task]) for n, m in models.items() if task in m["tasks"]]
        if len(pts) < 2:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        families: dict = {}
        for name, r in pts:
            families.setdefault(family(name, models[name]), []).append(
                (r.get("realised_cr", 1.0), r[key], name, r.get(f"{key}_ci95")))
        for fam, xs in families.items():
            xs.sort(key=lambda p: p[:3])
            ys = [y for _, y, _, _ in xs]
            err = None
            if all(ci for *_, ci in xs):  # the bootstrap interval as an error bar (asymmetric)
                err = [[y - ci[0] for (_, y, _, ci) in xs], [ci[1] - y for (_, y, _, ci) in xs]]
            ax.errorbar([x for x, *_ in xs], ys, yerr=err, marker="o", capsize=3, label=fam)
            if fam.split(" int")[0] in ("DMC", "GQA", "control"):
                for x, y, name, _ in xs:
                    ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel="realised compression ratio", ylabel=key + (" (log, lower is better)" if key == "perplexity" else "")
               + (", 95% CI" if any(f"{key}_ci95" in r for _, r in pts) else ""),
               title=f"{task}: {key} vs CR", xscale="log", xticks=[1, 2, 4, 8])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        if key == "perplexity":  # policies at 8x and a barely trained baseline span two decades
            ax.set_yscale("log")
            ax.get_yaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{task}_vs_cr.png", dpi=120)
        plt.close(fig)
        written.append(f"{task}_vs_cr.png")
    chosen = {n: m for n, m in models.items() if per_model is None or per_model(n, m)}
    for name, m in chosen.items():
        per_layer = next((r["cr_per_layer"] for r in m["tasks"].values() if isinstance(r, dict) and "cr_per_layer" in r), None)
        if per_layer:
            fig, ax = plt.subplots(figsize=(7, 3))
            ax.bar(range(len(per_layer)), per_layer)
            ax.set(xlabel="layer", ylabel="realised CR", title=f"{name}: CR per layer")
            fig.tight_layout()
            fig.savefig(out / f"cr_per_layer_{name}.png", dpi=120)
            plt.close(fig)
            written.append(f"cr_per_layer_{name}.png")
    for name, m in chosen.items():
        needle = m["tasks"].get("needle")
        if needle:
            import numpy as np

            grid = np.array([[needle["grid"][f"{c}/{d}"] for c in needle["contexts"]] for d in needle["depths"]])
            fig, ax = plt.subplots(figsize=(5, 3.5))
            im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(needle["contexts"])), needle["contexts"])
            ax.set_yticks(range(len(needle["depths"])), needle["depths"])
            ax.set(xlabel="context (tokens)", ylabel="needle depth", title=f"{name}: needle retrieval")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            fig.savefig(out / f"needle_{name}.png", dpi=120)
            plt.close(fig)
            written.append(f"needle_{name}.png")
    return written
