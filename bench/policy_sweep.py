"""The policy sweep of ``make compare``: minutes before (each policy variant alone in one process, one model load
and one pass per CR) and after (every CR of a policy in one batch, ``evaluate_variants``, the sweeps ``--jobs`` at a
time in worker processes, as ``make compare`` runs them), on the protocol's own settings, and whether the two paths
store the same answers.

    .venv/bin/python bench/policy_sweep.py checkpoints/smollm2-135m CONTROL_DIR --jobs 2 --paths after  # the protocol's
    .venv/bin/python bench/policy_sweep.py checkpoints/smollm2-135m --policies h2o --sample             # a quick look

Give the protocol's two bases (vanilla and the LM-only control: ``make compare`` leaves the control's export in the
run cache, ``~/.cache/dmc/runs/compare-135m/smollm2-135m-control-cpu-*/smollm2-135m-control-hf``) to time the
whole sweep; one base times half of it (the two have the same shape). Items go to temporary folders (nothing is
reused between paths or runs). ``--sample``: 4 blocks per perplexity task and 4 needle cells, for the equality
check in a few minutes. Answers are compared item by item: the same cache counts and needle answers, and the
largest relative gap between block NLLs (batch composition and thread count change float summation order, about
1e-7, which can flip a near-tie eviction: docs/baselines.md has the measured gaps).
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
from dmc.eval.workers import in_processes

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


def run_sweep(model: str, name: str, crs: list[float], path: str, sample: bool, out: Path,
              threads: int | None) -> float:
    """One policy's CRs on one base by ``path`` (``threads``: None in a worker, whose pool set them); its seconds."""
    if threads:
        torch.set_num_threads(threads)
    variants = [Variant(model, POLICIES[name](Budget(cr=c))) for c in crs]
    opts = eval_options(COMPARE_135M, out, SAMPLE if sample else [])
    opts.models = [model]
    start = time.perf_counter()
    if path == "before":
        for v in variants:
            evaluate_variant(opts, v, out, "float32")
    else:
        evaluate_variants(opts, variants, out, "float32")
    return round(time.perf_counter() - start, 1)


def timed_sweep(key: str, *args) -> tuple[str, float]:
    """``run_sweep(*args)`` in a worker: (``key``, its seconds)."""
    return key, run_sweep(*args)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="the base folders: vanilla (checkpoints/smollm2-135m), and the control")
    ap.add_argument("--policies", nargs="+", default=["all"])
    ap.add_argument("--crs", type=float, nargs="+", default=list(COMPARE_135M.crs))
    ap.add_argument("--paths", nargs="+", default=["before", "after"], choices=["before", "after"])
    ap.add_argument("--sample", action="store_true", help="a small fixed sample instead of the protocol's sizes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2, help="after: sweeps at once, each a process with threads / jobs")
    ap.add_argument("--out", default=None, help="default: bench/results/policy_sweep[-sample].json")
    ns = ap.parse_args(argv)
    names = sorted(POLICIES) if ns.policies == ["all"] else ns.policies
    work = Path(tempfile.mkdtemp(prefix="policy-sweep-"))
    sweeps = [(m, n) for m in ns.models for n in names]
    folder = {(m, n): f"{k}-{n}" for k, (m, n) in enumerate(sweeps)}
    seconds: dict[str, dict] = {p: {} for p in ns.paths}
    wall: dict[str, float] = {}
    for path in ns.paths:
        start = time.perf_counter()
        if path == "after" and ns.jobs > 1 and len(sweeps) > 1:
            runs = [(folder[s], *s, ns.crs, path, ns.sample, work / f"{folder[s]}-{path}", None) for s in sweeps]
            seconds[path] = dict(in_processes(timed_sweep, runs, ns.jobs, max(1, ns.threads // ns.jobs)))
        else:
            for s in sweeps:
                seconds[path][folder[s]] = run_sweep(*s, ns.crs, path, ns.sample, work / f"{folder[s]}-{path}",
                                                     ns.threads)
                print(json.dumps({"path": path, "sweep": folder[s], "seconds": seconds[path][folder[s]]}),
                      file=sys.stderr, flush=True)
        wall[path] = round((time.perf_counter() - start) / 60, 1)
        print(json.dumps({"path": path, "minutes": wall[path]}), file=sys.stderr, flush=True)
    agreement = None
    if len(ns.paths) == 2:
        both = [{f"{folder[s]}/{k}": v for s in sweeps for k, v in stored(work / f"{folder[s]}-{p}").items()}
                for p in ("before", "after")]
        agreement = compare_items(*both)
    result = {"command": "bench/policy_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "sample": ns.sample, "threads": ns.threads, "jobs": ns.jobs, "bases": len(ns.models),
              "minutes": wall, "sweep_seconds": seconds, "agreement": agreement}
    out = Path(ns.out or f"bench/results/policy_sweep{'-sample' if ns.sample else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(sweeps)} sweeps ({len(names)} policies x {len(ns.models)} base(s), CRs {ns.crs}): " +
          ", ".join(f"{p} {m} min" for p, m in wall.items()))
    if agreement is not None:
        a = agreement
        print(f"items equal: {a['items'] - len(a['mismatches'])}/{a['items']} "
              f"(NLL within {a['max_relative_nll_difference']:.1e} relative)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
