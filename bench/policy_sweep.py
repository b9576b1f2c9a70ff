"""The policy sweep of ``make compare``: minutes before (each policy variant alone, one model load and one pass per
CR) and after (every CR of a policy in one batch, ``evaluate_variants``), on the protocol's own settings, and
whether the two paths store the same answers.

    .venv/bin/python bench/policy_sweep.py checkpoints/smollm2-135m --policies all --crs 2 4 8
    .venv/bin/python bench/policy_sweep.py checkpoints/smollm2-135m --policies h2o --sample   # a quick look

The protocol runs the sweep on two base models (vanilla and the LM-only control) of the same shape, so its
sweep costs twice what this measures on one. Items go to temporary folders (nothing is reused between paths or
runs). ``--sample``: 4 blocks per perplexity task and 4 needle cells, for the equality check in a few minutes.
Answers are compared item by item: the same cache counts and needle answers, block NLLs within 1e-6 relative
(batch composition changes float summation order).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from dmc.eval.policies import POLICIES, Budget
from dmc.eval.protocol import COMPARE_135M, eval_options
from dmc.eval.run import Variant, evaluate_variant, evaluate_variants
from dmc.eval.store import read_items

SAMPLE = ["--ppl-blocks", "4", "--needle-contexts", "256", "1024", "--needle-depths", "0.2", "0.7"]


def stored(folder: Path) -> dict[str, dict]:
    return {p.name: read_items(p)[1] for p in (folder / "items").glob("*.jsonl")}


def compare_items(before: dict, after: dict) -> dict:
    """Item-by-item agreement of two paths' stores: mismatching item count and the largest relative NLL gap."""
    worst, mismatches, items = 0.0, [], 0
    for name, one in before.items():
        other = after.get(name, {})
        for item, a in one.items():
            items += 1
            b = other.get(item)
            if b is None or a["counts"] != b["counts"] or a.get("answer") != b.get("answer"):
                mismatches.append(f"{name}:{item}")
            elif "nll" in a:
                worst = max(worst, abs(a["nll"] - b["nll"]) / max(abs(a["nll"]), 1e-12))
    return {"items": items, "mismatches": mismatches, "max_relative_nll_difference": worst}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="the vanilla base folder (checkpoints/smollm2-135m)")
    ap.add_argument("--policies", nargs="+", default=["all"])
    ap.add_argument("--crs", type=float, nargs="+", default=list(COMPARE_135M.crs))
    ap.add_argument("--paths", nargs="+", default=["before", "after"], choices=["before", "after"])
    ap.add_argument("--sample", action="store_true", help="a small fixed sample instead of the protocol's sizes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="bench/results/policy_sweep.json")
    ns = ap.parse_args(argv)
    torch.set_num_threads(ns.threads)
    names = sorted(POLICIES) if ns.policies == ["all"] else ns.policies
    rows, work = [], Path(tempfile.mkdtemp(prefix="policy-sweep-"))
    for name in names:
        variants = [Variant(ns.model, POLICIES[name](Budget(cr=c))) for c in ns.crs]
        row = {"policy": name, "crs": ns.crs}
        for path in ns.paths:
            out = work / f"{name}-{path}"
            opts = eval_options(COMPARE_135M, out, SAMPLE if ns.sample else [])
            opts.models = [ns.model]
            start = time.perf_counter()
            if path == "before":
                for v in variants:
                    evaluate_variant(opts, v, out, "float32")
            else:
                evaluate_variants(opts, variants, out, "float32")
            row[f"{path}_s"] = round(time.perf_counter() - start, 1)
        if len(ns.paths) == 2:
            row["ratio"] = round(row["before_s"] / row["after_s"], 2)
            row["agreement"] = compare_items(stored(work / f"{name}-before"), stored(work / f"{name}-after"))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    totals = {p: round(sum(r[f"{p}_s"] for r in rows) / 60, 1) for p in ns.paths}
    result = {"command": "bench/policy_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "sample": ns.sample, "threads": ns.threads, "rows": rows, "minutes_one_base": totals,
              "minutes_protocol_two_bases": {p: round(2 * m, 1) for p, m in totals.items()}}
    Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
    Path(ns.out).write_text(json.dumps(result, indent=2))
    print("| policy | " + " | ".join(f"{p} (s)" for p in ns.paths) + (" | before / after | items equal |"
                                                                         if len(ns.paths) == 2 else " |"))
    print("|---" * (len(ns.paths) + 1 + 2 * (len(ns.paths) == 2)) + "|")
    for r in rows:
        cells = [str(r[f"{p}_s"]) for p in ns.paths]
        if "ratio" in r:
            a = r["agreement"]
            cells += [f"{r['ratio']:.2f}", f"{a['items'] - len(a['mismatches'])}/{a['items']} "
                      f"(NLL within {a['max_relative_nll_difference']:.1e})"]
        print(f"| {r['policy']} | " + " | ".join(cells) + " |")
    print(f"one base: {totals} minutes; the protocol's two bases: {result['minutes_protocol_two_bases']}")


if __name__ == "__main__":
    main()
