"""Speed and memory: delegates to ``dmc bench`` (vanilla and DMC on the same prompts, in one process)."""

from __future__ import annotations

from dataclasses import asdict


def run(model, opts, folder) -> dict:
    from ..bench import run as bench_run

    rows = bench_run(model.path, opts.speed_contexts, [opts.batch_size], [], opts.speed_decode_steps,
                     str(model.model.dtype).replace("torch.", ""), str(model.device), None)
    return {"rows": [asdict(r) for r in rows]}
