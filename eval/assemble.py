"""A protocol's results from its item store alone: ``results.json``, ``report.md`` and plots, with no model
present, the paired comparisons included. The run that computes items ends with the same assembly, so a report
rebuilt later from the committed items is the run's own, byte for byte.

An item file's header says which variant, task, settings, fingerprint and protocol unit it belongs to
(``eval/store.py``); a variant is complete when every item of each of its stores is there, under its unit's current
key. Two files of one variant, task and settings with different fingerprints (a retrained model beside the old
one's answers) are refused: one must go.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .curve import curve_lines, curve_plot, curve_rows
from .intervals import paired_accuracy_difference, paired_ppl_ratio, verdict
from .protocol import Protocol, Unit, unit_key, units
from .report import interval_text, markdown, plots, write_json
from .store import read_items
from .tasks import TaskError, needle, ppl

PPL_SOURCES = {"ppl": "stdlib", "ppl_prose": "prose"}


def stores(unit: Unit, opts) -> list[tuple[str, dict, list[str]]]:
    """(store task, settings, item ids) of every item file the variant's tasks write."""
    from .policies import POLICIES

    found = []
    for task in opts.tasks:
        if task in PPL_SOURCES:
            found.append((task, ppl.store_settings(opts, PPL_SOURCES[task]), ppl.item_ids(opts)))
        elif task == "needle":
            found.append(("needle", needle.store_settings(opts), needle.item_ids(opts)))
            if unit.policy and POLICIES[unit.policy].evicts:
                found.append((needle.QUESTION_AWARE, needle.store_settings(opts), needle.item_ids(opts)))
    return found


def _same(a, b) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _files(name: str, store_task: str, settings: dict, out: Path) -> list[tuple[Path, dict, dict]]:
    """(file, header, items) of each store file of this variant, task and settings."""
    found = []
    for path in sorted((out / "items").glob(f"{name}.{store_task}.*.jsonl")):
        try:
            header, items = read_items(path)
        except FileNotFoundError:  # removed as stale by a `--jobs` worker between the listing and the read
            continue
        if header and header["name"] == name and header["task"] == store_task and _same(header["settings"], settings):
            found.append((path, header, items))
    return found


def _one(name: str, store_task: str, settings: dict, out: Path) -> tuple[Path, dict, dict] | None:
    files = _files(name, store_task, settings, out)
    prints = sorted({h["fingerprint"] for _, h, _ in files})
    if len(prints) > 1:
        raise TaskError(f"{out / 'items'} holds {name} {store_task} items of {len(prints)} fingerprints "
                        f"({', '.join(prints)}): delete the stale file(s) ({', '.join(p.name for p, *_ in files)}), "
                        "or rerun `make compare`, which keeps those of the model now in the run cache")
    return files[0] if files else None


def variant_items(protocol: Protocol, unit: Unit, opts, out: Path) -> tuple[str, dict | None, dict]:
    """(status, a header, {store task: items}): "complete", "missing" (some item not computed) or "stale" (its
    items are of another recipe than the unit's current one)."""
    name, key = unit.name(protocol), unit_key(protocol, unit)
    header, found, status = None, {}, "complete"
    for store_task, settings, ids in stores(unit, opts):
        one = _one(name, store_task, settings, out)
        if one is None:
            status = "missing"
            continue
        _, h, items = one
        header = header or h
        found[store_task] = items
        if h.get("unit") != key:
            status = "stale" if status == "complete" else status
        elif any(i not in items for i in ids):
            status = "missing"
    return status, header, found


def remove_stale(protocol: Protocol, unit: Unit, opts, out: Path, fingerprint: str, log=print) -> None:
    """Before a variant is evaluated: its item files of another fingerprint (the model changed) or of another
    recipe go; they describe a model that no longer exists (git history keeps them)."""
    name, key = unit.name(protocol), unit_key(protocol, unit)
    for store_task, settings, _ in stores(unit, opts):
        for path, header, _ in _files(name, store_task, settings, out):
            if header["fingerprint"] != fingerprint or header.get("unit") != key:
                what = (f"its model changed ({header['fingerprint']} -> {fingerprint})" if header["fingerprint"] !=
                        fingerprint else f"its recipe changed ({header.get('unit')} -> {key})")
                log(f"{name}: {what}; re-running its {store_task} items, {path.name} removed")
                path.unlink()


def _summary(task: str, unit: Unit, found: dict, opts, kv_cr: float) -> dict:
    if task in PPL_SOURCES:
        return ppl.summarize(found[task], opts, kv_cr) | {"source": PPL_SOURCES[task]}
    return needle.summarize(found["needle"], opts, kv_cr, found.get(needle.QUESTION_AWARE))


# what the items' answers depend on (not the batch size a run happened to use)
SETTINGS = ("tasks", "ppl_block", "ppl_blocks", "needle_contexts", "needle_depths", "ci_resamples", "seed", "device",
            "dtype")


def assemble(protocol: Protocol, opts, out: Path) -> dict:
    """The protocol's results from the items under ``out`` (nothing is written)."""
    models, items, missing = {}, {}, []
    for unit in units(protocol):
        status, header, found = variant_items(protocol, unit, opts, out)
        name = unit.name(protocol)
        if status != "complete":
            missing.append({"name": name, "status": status})
            continue
        entry = {**header["model"], "unit": header["unit"]}
        if unit.role(protocol):
            entry["role"] = unit.role(protocol)
        if unit.policy:
            entry["policy_cr"] = unit.cr
        elif unit.model != "vanilla" and protocol.training(unit.model).cr is not None:
            entry["compare_cr"] = protocol.training(unit.model).cr  # the policies' CR it is paired with
        entry["tasks"] = {task: _summary(task, unit, found, opts, header["model"].get("kv_cr", 1.0)) for task in opts.tasks}
        models[name], items[name] = entry, found
    results = {"protocol": protocol.name, "command": f"dmc compare --protocol {protocol.name}",
               "tasks": list(opts.tasks), "settings": {k: getattr(opts, k) for k in SETTINGS}, "models": models,
               "missing": missing}
    results["paired"] = paired(protocol, models, items, opts)
    if protocol.kind == "curve":
        results["curve"] = curve_rows(protocol, results)
    return results


def write(results: dict, opts, out: Path) -> None:
    """results.json, report.md and plots; the two files replace their predecessors whole."""
    out.mkdir(parents=True, exist_ok=True)
    # per model only the trained ones (30-odd policy heat maps would bury them); the policies are in the CR plots
    results["plots"] = plots(results, out, per_model=lambda name, m: not m.get("policy")) if results["models"] else []
    results["plots"] += curve_plot(results, out) if "curve" in results else paired_plot(results, out)
    for name in ("results.partial.json",):
        (out / name).unlink(missing_ok=True)
    write_json(out / "results.json", results)
    tmp = out / "report.md.tmp"
    tmp.write_text(report(results))
    os.replace(tmp, out / "report.md")


# ---- paired comparisons ---------------------------------------------------------------------------------------

def _pairs(protocol: Protocol) -> list[tuple[Unit, Unit, bool]]:
    """(method, reference, policy reference?) for every pair the report compares: each model and policy against
    the vanilla model and the control; each compressor against every policy at its CR; DMS against DMC at the same
    CR."""
    control = next((t.key for t in protocol.trainings if t.role == "control"), None)
    every = units(protocol)
    pairs = []
    for u in every:  # against the vanilla model and the control: a training's own (same tokens), else the protocol's
        own = protocol.training(u.model).control if u.model != "vanilla" and not u.policy else None
        refs = [Unit("vanilla")] + ([Unit(own or control)] if own or control else [])
        pairs += [(u, r, False) for r in refs if u != r and not (u.model == "vanilla" and not u.policy)]
    for t in protocol.trainings:
        if t.cr is not None:
            pairs += [(Unit(t.key), p, True) for p in every if p.policy and p.cr == t.cr]
    # the two learned methods at the same CR: DMS against DMC (never the reverse: one row per pair)
    pairs += [(Unit(a.key), Unit(b.key), False) for a in protocol.trainings for b in protocol.trainings
              if a.role == "dms" and b.role == "dmc" and a.cr is not None and a.cr == b.cr]
    return pairs


def paired(protocol: Protocol, models: dict, items: dict, opts) -> list[dict]:
    rows = []
    for a, b, against_policy in _pairs(protocol):
        na, nb = a.name(protocol), b.name(protocol)
        if na not in models or nb not in models:
            continue
        kw = {"names": (na, nb), "resamples": opts.ci_resamples or 1000, "seed": opts.seed}
        for task in opts.tasks:
            if task in PPL_SOURCES:
                r = paired_ppl_ratio(items[na][task], items[nb][task], **kw)
                rows.append({"a": na, "b": nb, "task": task, **r, "verdict": verdict(r["ci95"], 1.0, True)})
                continue
            settings = [("needle", "needle")]
            if against_policy and needle.QUESTION_AWARE in items[nb]:
                settings.append(("needle", needle.QUESTION_AWARE))  # DMC's one setting against the policy's other
            for sa, sb in settings:
                r = paired_accuracy_difference(items[na][sa], items[nb][sb], **kw)
                rows.append({"a": na, "b": nb, "task": sb, **r, "verdict": verdict(r["ci95"], 0.0, False)})
    return rows


def paired_plot(results: dict, out: Path) -> list[str]:
    """paired_vs_control.png: every method's perplexity over the control's on the same blocks (code and prose),
    with its paired 95% interval; where the bar misses 1 the difference is shown."""
    control = next((n for n, m in results["models"].items() if m.get("role") == "control"), None)
    tasks = [t for t in ("ppl", "ppl_prose") if t in results["tasks"]]
    rows = {t: [p for p in results["paired"] if p["b"] == control and p["task"] == t] for t in tasks}
    if control is None or not any(rows.values()):
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(p["a"] for t in tasks for p in rows[t]))
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 0.28 * len(names) + 1.2), sharey=True,
                             squeeze=False)
    for ax, task in zip(axes[0], tasks):
        by_name = {p["a"]: p for p in rows[task]}
        for y, name in enumerate(names):
            p = by_name.get(name)
            if p is None:
                continue
            color = {"better": "tab:green", "worse": "tab:red"}.get(p["verdict"], "tab:gray")
            ax.errorbar(p["ratio"], y, xerr=[[p["ratio"] - p["ci95"][0]], [p["ci95"][1] - p["ratio"]]], fmt="o",
                        color=color, capsize=2, markersize=3)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set(xlabel=f"perplexity / {control}'s (paired 95% CI)", title={"ppl": "code", "ppl_prose": "prose"}[task],
               ylim=(len(names) - 0.5, -0.5))  # the report's order, top to bottom
        ax.set_yticks(range(len(names)), names, fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "paired_vs_control.png", dpi=120)
    plt.close(fig)
    return ["paired_vs_control.png"]


# ---- report ---------------------------------------------------------------------------------------------------

def _cell(value: float, ci) -> str:
    return f"{value:.4g} {interval_text(ci)}"


def _find(results: dict, a: str, b: str, task: str) -> dict | None:
    return next((p for p in results["paired"] if p["a"] == a and p["b"] == b and p["task"] == task), None)


def _ratio(p: dict | None, mark_verdict: bool = True) -> str:
    if p is None:
        return "–"
    mark = {"better": " (better)", "worse": " (worse)"}.get(p["verdict"], "") if mark_verdict else ""
    key = "ratio" if "ratio" in p else "difference"
    fmt = "{:.3f}" if key == "ratio" else "{:+.2f}"
    return f"{fmt.format(p[key])} [{fmt.format(p['ci95'][0])}, {fmt.format(p['ci95'][1])}]{mark}"


def glance(results: dict) -> list[str]:
    """The table README quotes: each model and the best policy at each CR, perplexities with their intervals,
    and the paired ratios against the control and against the best policy at the compressor's CR."""
    models = results["models"]
    control = next((n for n, m in models.items() if m.get("role") == "control"), None)
    ppl_tasks = [t for t in ("ppl", "ppl_prose") if t in results["tasks"]]
    label = {"ppl": "code", "ppl_prose": "prose"}

    def best_policy(cr: float, task: str) -> str | None:
        at = [(m["tasks"][task]["perplexity"], n) for n, m in models.items() if m.get("policy_cr") == cr]
        return min(at)[1] if at else None

    head = ["model", "realised CR"] + [f"{label[t]} ppl [95% CI]" for t in ppl_tasks]
    head += [f"{label[t]} / control" for t in ppl_tasks if control]
    head += [f"{label[t]} / best policy at its CR" for t in ppl_tasks]
    if "needle" in results["tasks"]:
        head += ["needle", "needle, question-aware"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    crs = sorted({m["policy_cr"] for m in models.values() if m.get("policy_cr")})
    shown = [n for n, m in models.items() if not m.get("policy")]
    shown += list(dict.fromkeys(b for cr in crs for t in ppl_tasks[:1] if (b := best_policy(cr, t))))
    for name in shown:
        m = models[name]
        tasks = m["tasks"]
        cr = next((tasks[t]["realised_cr"] for t in tasks if "realised_cr" in tasks[t]), 1.0)
        row = [name, f"{cr:.2f}"] + [_cell(tasks[t]["perplexity"], tasks[t].get("perplexity_ci95")) for t in ppl_tasks]
        if control:
            row += [_ratio(_find(results, name, control, t)) for t in ppl_tasks]
        target = m.get("compare_cr")
        for t in ppl_tasks:
            best = best_policy(target, t) if target else None
            row.append(f"{_ratio(_find(results, name, best, t))} vs {best}" if best else "–")
        if "needle" in results["tasks"]:
            n = tasks["needle"]
            row += [_cell(n["accuracy"], n.get("accuracy_ci95")),
                    _cell(n["question_aware_accuracy"], n.get("question_aware_accuracy_ci95"))
                    if "question_aware_accuracy" in n else "–"]
        lines.append("| " + " | ".join(row) + " |")
    return lines


MAKE_TARGETS = {"compare-135m": "make compare", "curve-135m": "make curve"}


def report(results: dict) -> str:
    s = results["settings"]
    target = MAKE_TARGETS.get(results["protocol"])
    command = f"`{target}` (`{results['command']}`)" if target else f"`{results['command']}`"
    needle = (f"; needle on {len(s['needle_contexts']) * len(s['needle_depths'])} cells"
              if "needle" in results["tasks"] else "")
    lines = [f"# {results['protocol']}: the {'tokens curve' if 'curve' in results else 'comparison'}\n",
             f"Command: {command}; rebuilt from the committed items under `items/` with no model present.\n",
             f"Perplexity on {s['ppl_blocks']} blocks of {s['ppl_block']} tokens (code: held-out Python stdlib; "
             f"prose: English never trained on){needle}. Intervals: percentile bootstrap over blocks or cells. "
             "Paired: both methods resampled on the same blocks; a ratio below 1 means the first has lower perplexity; \"better\"/\"worse\" only where the "
             "paired 95% interval excludes 1 (a ratio) or 0 (a needle accuracy difference). The best policy at a CR "
             "is chosen by its point estimate on the same blocks, which favours the policy.\n"]
    if results["missing"]:
        lines.append(f"**Not complete ({len(results['missing'])} units):** " + ", ".join(
            f"{m['name']} ({m['status']})" for m in results["missing"]) + f". Run `{target or results['command']}` to "
            "compute them.\n")
    lines += curve_lines(results)
    lines += ["## At a glance\n", *glance(results), ""]
    lines += ["## Every paired comparison\n", "| A | B | task | A / B (ppl) or A - B (needle) [paired 95% CI] | "
              "items | verdict |", "|---|---|---|---|---|---|"]
    for p in results["paired"]:
        lines.append(f"| {p['a']} | {p['b']} | {p['task']} | {_ratio(p, False)} | {p['items']} | {p['verdict']} |")
    lines.append("")
    body = markdown(results).split("\n", 3)[3]  # the per-task tables of `dmc eval`, without their title
    return "\n".join(lines) + "\n## Per task\n\n" + body

