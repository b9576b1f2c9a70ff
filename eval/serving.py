"""Continuous batching under a KV-memory budget, as a benchmark: every request generated greedily to its length
by the serving engine (``dmc.serve.engine``, the loop behind ``dmc serve``), in this thread, with the engine's
counters. Outputs equal generating each request alone."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dmc.serve.engine import BudgetError, Engine, ErrorEvent, FinishEvent, ServeStats
from dmc.serve.engine import Request as EngineRequest
from dmc.serve.sampling import SamplingParams

from .policies import Policy

__all__ = ["BudgetError", "Request", "ServeResult", "ServeStats", "serve"]


@dataclass
class Request:
    prompt: torch.Tensor  # (T,) token ids
    max_new_tokens: int


@dataclass
class ServeResult:
    outputs: list[list[int]]  # greedy tokens of each request, in request order
    stats: ServeStats
    logits: list[torch.Tensor] | None = None  # (new tokens, V) per request, with ``record_logits``


def serve(model, requests: list[Request], budget_bytes: int, policy: Policy | None = None, block_size: int = 16,
          progress=None, record_logits: bool = False) -> ServeResult:
    """Generate every request greedily under the budget.

    ``progress``: called with the number of newly finished requests (a tqdm bar's update)."""
    engine = Engine(model, budget_bytes, policy, block_size, record_logits=record_logits)
    outputs: list[list[int]] = [[] for _ in requests]
    scores: list[list[torch.Tensor]] = [[] for _ in requests]
    errors: list[str] = []

    def sink_for(index: int):
        def sink(event):
            if isinstance(event, ErrorEvent):
                errors.append(f"request {index} ({requests[index].prompt.numel()} prompt tokens): {event.message}")
            elif isinstance(event, FinishEvent):
                if event.completion_tokens < requests[index].max_new_tokens:  # the budget ended it early
                    errors.append(f"request {index}: the KV budget of {budget_bytes / 2**20:.2f} MiB cannot hold one "
                                  f"sequence to its end ({event.completion_tokens} of "
                                  f"{requests[index].max_new_tokens} tokens); raise --kv-budget or shorten the "
                                  "requests")
                if progress:
                    progress(1)
            else:
                outputs[index].append(event.token)
                if event.logits is not None:
                    scores[index].append(event.logits)
        return sink

    for i, r in enumerate(requests):
        engine.submit(EngineRequest(i, r.prompt, SamplingParams(max_tokens=r.max_new_tokens), sink_for(i)))
    engine.run_until_done()
    if errors:
        raise BudgetError(errors[0])
    return ServeResult(outputs, engine.stats, [torch.stack(s) for s in scores] if record_logits else None)
