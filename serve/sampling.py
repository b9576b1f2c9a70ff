"""Per-request sampling: greedy at temperature 0, else temperature and nucleus (top-p) sampling from the request's
own generator, so that a fixed seed gives the same tokens whatever else is in the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.0  # 0 (below GREEDY_BELOW): greedy
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed per request
    stop_token_ids: tuple[int, ...] = ()  # a sampled one ends the sequence ("stop"); it counts as generated
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's log-probability and the k most likely


GREEDY_BELOW = 1e-5  # a temperature this small is greedy (dividing by it would overflow to inf and NaN)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """The next token from one row of logits (V,)."""
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it is below top_p.
        keep = (sorted_p.cumsum(-1) - sorted_p) < params.top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def logprobs_of(logits: torch.Tensor, token: int, k: int) -> tuple[float, list[tuple[int, float]]]:
    """The model's log-probability of ``token`` (before temperature and top-p, as OpenAI reports it) and the
    ``k`` most likely tokens with theirs."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    top = logp.topk(k) if k > 0 else None
    pairs = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return float(logp[token]), pairs
