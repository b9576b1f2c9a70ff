"""``dmc eval``: evaluate vanilla Llama and DMC HF folders through the same code.

    dmc eval MODEL [MODEL ...] --tasks ppl mmlu humaneval needle speed --out DIR

DMC models run on their compressed cache throughout and every task reports the realised CR it ran at.
Finished items are cached under DIR/items, so rerunning the same command continues an interrupted run.
Writes DIR/results.json, DIR/report.md and PNG plots when it finishes (DIR/results.partial.json until then).
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch

from dmc.ops.kv_quant import KV_BITS

from .report import markdown, plots, write_json
from .tasks import TASKS, TaskError, task_module


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dmc eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="HF folders: vanilla Llama or exported DMC")
    ap.add_argument("--tasks", nargs="+", default=["ppl"], help=f"any of {', '.join(TASKS)}")
    ap.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    ap.add_argument("--limit", type=int, default=None, help="mmlu: questions per subject; humaneval: problems")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ci-resamples", type=int, default=1000, help="bootstrap resamples for the 95%% intervals of "
                    "ppl (over blocks) and needle (over cells); 0: no intervals")
    ap.add_argument("--kv-bits", type=int, nargs="+", default=[16], help="cache precisions to run every model at: 16 "
                    "(the model's dtype), 8 or 4 (closed slots as group-wise integer codes; a vanilla model keeps "
                    "every token on the coded store)")
    ap.add_argument("--kv-group", type=int, default=None, help="channels per quantisation group at 8/4 bits "
                    "(default: the DMC model's dmc_kv_group, else 32 at int8 and 16 at int4); a divisor of the head dim")
    g = ap.add_argument_group("baseline cache policies (vanilla Llama folders)")
    g.add_argument("--policy", default=None, help="run the models under a training-free cache policy: "
                   "streaming_llm, tova, h2o, scissorhands, snapkv")
    g.add_argument("--budget-cr", type=float, default=None, help="policy budget: ceil(tokens / CR) slots")
    g.add_argument("--budget-tokens", type=int, default=None, help="policy budget: a fixed number of slots")
    g = ap.add_argument_group("ppl")
    g.add_argument("--ppl-source", default="stdlib", help="'stdlib' (held-out files), 'prose' (English, never "
                   "trained on; also the ppl_prose task) or 'files:GLOB'")
    g.add_argument("--ppl-block", type=int, default=512, help="tokens per block")
    g.add_argument("--ppl-blocks", type=int, default=32, help="number of blocks")
    g = ap.add_argument_group("mmlu")
    g.add_argument("--mmlu-data", default="hub", help="'hub' (cais/mmlu), a Hendrycks data folder, or a .jsonl file")
    g.add_argument("--mmlu-shots", type=int, default=5)
    g = ap.add_argument_group("humaneval")
    g.add_argument("--humaneval-samples", type=int, default=1, help="n samples per problem (pass@k for k <= n)")
    g.add_argument("--humaneval-max-new-tokens", type=int, default=512)
    g.add_argument("--humaneval-timeout", type=float, default=10.0, help="seconds per program")
    g.add_argument("--allow-weak-sandbox", action="store_true", help="run generated code with rlimits only when "
                   "this machine has no bwrap and no unprivileged user namespaces (network on, home readable)")
    g.add_argument("--temperature", type=float, default=0.8, help="sampling temperature when n > 1")
    g = ap.add_argument_group("needle")
    g.add_argument("--needle-contexts", type=int, nargs="+", default=[256, 512, 1024])
    g.add_argument("--needle-depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    g = ap.add_argument_group("speed")
    g.add_argument("--speed-contexts", type=int, nargs="+", default=[1024])
    g.add_argument("--speed-decode-steps", type=int, default=16)
    return ap


class Variant(NamedTuple):
    """One evaluated setting: a model folder, optionally under a cache policy, at a cache precision. A role
    ("control", ...) is recorded with the model's results."""

    path: str
    policy: object = None
    role: str | None = None
    kv_bits: int = 16
    unit: str | None = None  # the protocol unit it belongs to (``eval/protocol.py``), recorded with its items


def check_kv_bits(bits: list[int], flag: str = "--kv-bits") -> tuple[int, ...]:
    if any(b not in KV_BITS for b in bits):
        raise TaskError(f"{flag} takes {', '.join(map(str, KV_BITS))} (got {' '.join(map(str, bits))})")
    return tuple(dict.fromkeys(bits))


def evaluate(opts: argparse.Namespace, command: str, variants: list[Variant] | None = None) -> dict:
    """Run ``opts.tasks`` on every ``Variant`` (default: every ``opts.models`` under ``--policy``, if any, at each
    ``--kv-bits``)."""
    for task in opts.tasks:
        task_module(task)  # unknown names fail before any model is loaded
    checks = [("--humaneval-samples", opts.humaneval_samples >= 1, "at least 1"),
              ("--ppl-block", opts.ppl_block >= 2, "at least 2 tokens"), ("--ppl-blocks", opts.ppl_blocks >= 1, "at least 1"),
              ("--limit", opts.limit is None or opts.limit >= 1, "at least 1 (or leave it out for everything)"),
              ("--batch-size", opts.batch_size >= 1, "at least 1"),
              ("--ci-resamples", opts.ci_resamples >= 0, "0 (no intervals) or more"),
              ("--needle-depths", all(0 <= d <= 1 for d in opts.needle_depths), "fractions between 0 and 1"),
              ("--needle-contexts", all(c >= 64 for c in opts.needle_contexts), "at least 64 tokens each")]
    for flag, ok, want in checks:
        if not ok:
            raise TaskError(f"{flag}: use {want}")
    bits = check_kv_bits(opts.kv_bits)
    if variants is None:
        policy = make_policy(opts)
        variants = [Variant(path, policy, kv_bits=b) for path in opts.models for b in bits]
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    # results.json and report.md describe a finished run only: a run that dies must not leave the previous
    # run's beside its own items, nor its own half; its progress goes to results.partial.json.
    for stale in ("results.json", "report.md"):
        (out / stale).unlink(missing_ok=True)
    partial = out / "results.partial.json"
    dtype = opts.dtype or ("bfloat16" if opts.device.startswith("cuda") else "float32")
    import transformers

    results = {"command": command, "tasks": opts.tasks, "models": {}, "settings": {k: v for k, v in vars(opts).items()},
               "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                            "python": platform.python_version()}, "device": opts.device, "dtype": dtype}
    began, done = time.perf_counter(), 0
    for group in sweeps(variants, opts.tasks):
        minutes = (time.perf_counter() - began) / 60
        running: dict = {}  # a sweep's variants in progress, each as far as its tasks have gone

        def progress(name: str, entry: dict, running=running) -> None:
            running[name] = entry
            write_json(partial, results | {"models": {**results["models"], **running}})

        entries = evaluate_variants(opts, group, out, dtype, progress_place(done, len(group), len(variants)),
                                    f", {minutes:.0f} min so far", taken=results["models"], after_task=progress)
        for entry in entries:
            results["models"][entry.pop("name")] = entry
        done += len(group)
    results["plots"] = plots(results, out)
    write_json(out / "results.json", results)
    (out / "report.md").write_text(markdown(results))
    partial.unlink(missing_ok=True)
    return results


def evaluate_variant(opts: argparse.Namespace, variant: Variant, out: Path, dtype: str, place: str = "", note: str = "",
                     taken=(), before_tasks=None, after_task=None) -> dict:
    """Every task of ``opts.tasks`` on one variant (finished items come from the store under ``out``): its
    results entry, with its ``name``. ``taken``: names already in the results (refused before any task runs);
    ``before_tasks(model)`` is called once the model is loaded, ``after_task(name, entry)`` as each task finishes."""
    return evaluate_variants(opts, [variant], out, dtype, place, note, taken, before_tasks, after_task)[0]


def progress_place(done: int, size: int, total: int) -> str:
    """A long run's place in its list: [4/11] for one variant, [4-6/11] for a sweep."""
    return f"[{done + 1}{f'-{done + size}' if size > 1 else ''}/{total}]"


def sweeps(variants: list[Variant], tasks: list[str]) -> list[list[Variant]]:
    """Consecutive variants that are one model under one kind of policy at several CRs, grouped to run as one
    sweep (``evaluate_variants``); every other variant alone. The order is kept."""
    def key(v: Variant):
        if v.policy is None or v.policy.budget.cr is None or not sweepable(tasks):
            return None
        return (v.path, type(v.policy), v.kv_bits, v.role)

    groups: list[list[Variant]] = []
    for v in variants:
        if groups and key(v) is not None and key(groups[-1][-1]) == key(v):
            groups[-1].append(v)
        else:
            groups.append([v])
    return groups


def sweepable(tasks: list[str]) -> bool:
    """Whether every task can run several CRs of one policy in one batch (``run_sweep``)."""
    return all(hasattr(task_module(t), "run_sweep") for t in tasks)


def evaluate_variants(opts: argparse.Namespace, variants: list[Variant], out: Path, dtype: str, place: str = "",
                      note: str = "", taken=(), before_tasks=None, after_task=None) -> list[dict]:
    """``evaluate_variant`` for variants of one model folder under one kind of policy at several budgets, in one
    pass: the model is loaded once and each batch holds every budget's rows (``RowBudgets``), each variant's
    answers stored under its own name and fingerprint, as if it had run alone (``sweepable`` tasks only)."""
    from dmc.generate import ModelFolderError

    from .lm import EvalModel

    first = variants[0]
    if len(variants) > 1 and not (sweepable(opts.tasks) and all(
            v.policy is not None and v.policy.budget.cr is not None and type(v.policy) is type(first.policy) and
            (v.path, v.kv_bits, v.role) ==
            (first.path, first.kv_bits, first.role) for v in variants)):
        raise ValueError("a sweep runs one model folder under one kind of policy at several budgets")
    try:
        model = EvalModel(first.path, dtype, opts.device, opts.batch_size, policy=first.policy,
                          kv_bits=first.kv_bits, kv_group=opts.kv_group)
    except (ModelFolderError, ValueError) as err:
        raise TaskError(str(err)) from err
    views = [model] if len(variants) == 1 else [model.under(v.policy) for v in variants]
    for view, variant in zip(views, variants):
        if view.name in taken:
            raise TaskError(f"two models are both named {view.name!r}; give their folders different names")
        view.unit = variant.unit
        if before_tasks is not None:
            before_tasks(view)
    role = first.role
    names = ", ".join(v.name for v in views)
    print(f"{place} {names}{f' ({role})' if role else ''}{note}".strip(), file=sys.stderr,
          flush=True)  # a long compare's place in its list; the task bars show the rest
    entries = [{**view.describe(), **({"role": role} if role else {}), "tasks": {}, "seconds": {}} for view in views]
    crs = [v.policy.budget.cr if len(views) > 1 else None for v in variants]
    for task in opts.tasks:
        start = time.perf_counter()
        if len(views) == 1:
            results = [task_module(task).run(model, opts, out)]
        else:
            results = task_module(task).run_sweep(model, list(zip(views, crs)), opts, out)
        for view, entry, result in zip(views, entries, results):
            entry["tasks"][task] = result
            entry["seconds"][task] = round((time.perf_counter() - start) / len(views), 1)
            if after_task is not None:
                after_task(view.name, entry)
    return [{"name": view.name, **entry} for view, entry in zip(views, entries)]


def make_policy(opts):
    if opts.policy is None:
        if opts.budget_cr is not None or opts.budget_tokens is not None:
            raise TaskError("--budget-cr/--budget-tokens go with --policy NAME")
        return None
    from .policies import POLICIES, Budget

    if opts.policy not in POLICIES:
        raise TaskError(f"unknown policy {opts.policy!r}; choose from {', '.join(sorted(POLICIES))}")
    try:
        return POLICIES[opts.policy](Budget(cr=opts.budget_cr, tokens=opts.budget_tokens))
    except ValueError as err:
        raise TaskError(f"--policy {opts.policy}: {err} (--budget-cr C or --budget-tokens N)") from err


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    opts = parser().parse_args(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        results = evaluate(opts, "dmc eval " + shlex.join(argv))
    except TaskError as err:
        sys.exit(f"dmc eval: error: {err}")
    print((Path(opts.out) / "report.md").read_text())
    print(f"wrote {Path(opts.out) / 'results.json'}, report.md and {len(results['plots'])} plots")
