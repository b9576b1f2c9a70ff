"""Continuous batching under a KV-memory budget: the paper's throughput measurement.

Requests (prompt, output length) wait in a queue. Each is prefilled alone into a cache of its own and, when its
slots fit in the budget beside the sequences in flight, copied into a free row of one shared paged cache; every
step decodes one token for every sequence in flight; a finished sequence's blocks go back to the free list at
once and its row takes the next request. With a compressed cache (DMC, or an eviction policy) sequences hold
fewer blocks, so more of them fit, and tokens per second rise.

The budget counts the bytes of slot blocks handed out by the allocator (``allocated_bytes``). A request is
admitted when every sequence in flight, itself included, still fits at its end, growing at the CR it has shown
so far (for vanilla, exactly). Before each step the loop reserves the worst case of that step (a new block for
every pair at a block boundary, as if all of them appended); if that would not fit (a sequence compressing
less than it did), the newest sequence is preempted (its blocks freed, its request queued again at the front,
recomputed from scratch later, as vLLM's recompute preemption), so the budget holds at every step. Greedy
decoding; outputs equal generating each request alone.

The vanilla model runs on the same paged storage with every token appended (``KeepAll``), so the ratio to it
isolates the compression.
"""

from __future__ import annotations

import math
import time
from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from dmc.methods import is_compressed
from dmc.methods import new_cache as method_cache
from dmc.slot_cache import SlotCache

from .policies import KeepAll, Policy, PolicyCache, policy_attention


class BudgetError(ValueError):
    """The budget cannot hold one sequence; the message says how much one needs."""


@dataclass
class Request:
    prompt: torch.Tensor  # (T,) token ids
    max_new_tokens: int


@dataclass
class ServeStats:
    generated_tokens: int = 0  # tokens of the outputs delivered (the prefill's first token included)
    discarded_tokens: int = 0  # tokens of preempted sequences, generated again later
    steps: int = 0  # decode steps (one token for every sequence in flight)
    wall_s: float = 0.0
    in_flight: list[int] = field(default_factory=list)  # sequences in flight at each step
    kv_bytes: list[int] = field(default_factory=list)  # slot bytes handed out after each step
    realised_cr: list[float] = field(default_factory=list)  # each finished sequence's tokens fed / mean live slots
    decode_s: float = 0.0  # time in decode steps (the rest of wall_s: prefills and bookkeeping)
    peak_bytes: int = 0  # most slot bytes handed out at any point (after admission, after each step)
    preempted: int = 0
    final_bytes: int = 0  # slot bytes still handed out when every request is done (0: every block freed)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps alone (one per sequence in flight per step)."""
        return sum(self.in_flight) / self.decode_s if self.decode_s else 0.0

    @property
    def mean_kv_bytes(self) -> float:
        return sum(self.kv_bytes) / len(self.kv_bytes) if self.kv_bytes else 0.0

    @property
    def mean_realised_cr(self) -> float:
        return sum(self.realised_cr) / len(self.realised_cr) if self.realised_cr else 1.0

    @property
    def mean_in_flight(self) -> float:
        return sum(self.in_flight) / len(self.in_flight) if self.in_flight else 0.0

    @property
    def max_in_flight(self) -> int:
        return max(self.in_flight, default=0)


def new_cache(model, policy: Policy | None, block_size: int) -> SlotCache:
    """A DMC or DMS model's own cache; a vanilla Llama's policy cache (``KeepAll``: every token kept)."""
    if is_compressed(model.config):
        if policy is not None:
            raise ValueError("an eviction policy runs on a vanilla Llama, not on a DMC or DMS model")
        return method_cache(model.config, block_size=block_size)
    return PolicyCache(model.config, policy or KeepAll(), block_size=block_size)


@dataclass
class _Slot:
    """A sequence in flight: its request, its place in the queue order, its tokens so far."""

    index: int
    request: Request
    tokens: list[int]
    admitted_at: int
    logits: list[torch.Tensor] | None = None  # each token's logits (V,), when the server records them


class Server:
    """The shared cache and the rows of the sequences in flight (see the module docstring)."""

    def __init__(self, model, budget_bytes: int, policy: Policy | None = None, block_size: int = 16,
                 record_logits: bool = False):
        if policy is not None and policy.history:
            raise ValueError(f"{policy.name} keeps a per-step attention history, which continuous batching "
                             "does not carry across rows yet; use h2o, tova, streaming_llm or keep_all")
        self.model, self.budget, self.policy, self.block_size = model, budget_bytes, policy, block_size
        self.record_logits = record_logits
        self.cache = new_cache(model, policy, block_size)
        self.rows: list[_Slot | None] = []
        self.stats = ServeStats()

    # ---- memory ----------------------------------------------------------------------------------------
    def _layers(self):
        return self.cache.layers

    def _active(self) -> torch.Tensor:
        return torch.tensor([r is not None for r in self.rows], dtype=torch.bool, device=self.model.device)

    def _fits(self, solo: SlotCache | None = None) -> bool:
        """Whether the slots in flight (and ``solo``'s, to be admitted) plus the next step's worst case fit."""
        held = self.cache.allocated_bytes() + _edge_bytes(self.cache, self._active())
        if solo is not None:
            held += solo.allocated_bytes() + _edge_bytes(solo, None)
        return held <= self.budget

    # ---- admission, release, preemption -----------------------------------------------------------------
    def _free_row(self) -> int:
        if None in self.rows:
            return self.rows.index(None)
        for layer in self._layers():
            if not layer.is_initialized:
                layer._init_state(0, self.model.dtype, self.model.device)
            layer.add_sequences(1)
        self.rows.append(None)
        return len(self.rows) - 1

    @torch.no_grad()
    def prefill(self, request: Request):
        """The request's prompt alone in a cache of its own: (cache, logits (V,) of the first generated token)."""
        solo = new_cache(self.model, self.policy, self.block_size)
        ids = request.prompt.to(self.model.device)[None]
        logits = self.model(ids, past_key_values=solo, use_cache=True, logits_to_keep=1).logits
        return solo, logits[0, -1]

    def _growth_bytes(self, cache: SlotCache, rows: list[tuple[int, _Slot | Request, int]]) -> int:
        """Bytes the sequences ``rows`` ((row, slot or request, tokens still to feed)) will take to their end if
        they go on compressing as they have so far (each pair's remaining tokens over the sequence's realised
        CR): admission's watermark, so that a new sequence does not at once preempt the ones in flight."""
        total = 0
        for b, owner, remaining in rows:
            request = owner.request if isinstance(owner, _Slot) else owner
            fed = request.prompt.numel() + (len(owner.tokens) - 1 if isinstance(owner, _Slot) else 0)
            lens = torch.stack([layer.lens[b] for layer in cache.layers])  # (L, H_kv)
            cr = fed / max(float(lens.float().mean()), 1.0)
            grow = math.ceil(remaining / cr)
            bs = self.block_size
            blocks = (-(-(lens + grow) // bs)) - (-(-lens // bs))
            total += int(blocks.sum()) * cache.layers[0].block_bytes()
        return total

    def admit(self, index: int, request: Request, solo: SlotCache, first: torch.Tensor) -> bool:
        """Copy a prefilled request into a free row if it fits beside the sequences in flight, all of them
        growing to their end at the CR they show so far (vanilla: exactly what they will need)."""
        live = [(b, s, s.request.max_new_tokens - len(s.tokens)) for b, s in enumerate(self.rows) if s is not None]
        held = self.cache.allocated_bytes() + solo.allocated_bytes()
        held += self._growth_bytes(self.cache, live) + self._growth_bytes(solo, [(0, request, request.max_new_tokens - 1)])
        if held > self.budget or not self._fits(solo):
            return False
        row = self._free_row()
        for layer, other in zip(self._layers(), solo.layers):
            layer.insert_sequence(row, other, 0)
            layer.seen_tokens = max(layer.seen_tokens, other.seen_tokens)
        self.rows[row] = _Slot(index, request, [int(first.argmax())], self.stats.steps,
                               [first] if self.record_logits else None)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.cache.allocated_bytes())
        return True

    def _realised_cr(self, row: int, slot: _Slot) -> float:
        fed = slot.request.prompt.numel() + len(slot.tokens) - 1  # the last token is generated, not yet fed
        slots = torch.stack([layer.lens[row].float() for layer in self._layers()]).mean()
        return fed / max(float(slots), 1.0)

    def release(self, row: int) -> _Slot:
        for layer in self._layers():
            layer.release_sequence(row)
        slot, self.rows[row] = self.rows[row], None
        return slot

    def preempt_newest(self) -> _Slot:
        live = [(s.admitted_at, s.index, b) for b, s in enumerate(self.rows) if s is not None]
        _, _, row = max(live)
        self.stats.preempted += 1
        self.stats.discarded_tokens += len(self.rows[row].tokens)
        return self.release(row)

    # ---- one decode step ---------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self) -> list[_Slot]:
        """One token for every sequence in flight; returns the sequences that finished (released)."""
        device = self.model.device
        active = [s is not None for s in self.rows]
        ids = torch.tensor([[s.tokens[-1] if s else 0] for s in self.rows], device=device)
        pos = torch.tensor([[s.request.prompt.numel() + len(s.tokens) - 1 if s else 0] for s in self.rows],
                           device=device)
        past = self.cache.get_seq_length()
        mask = torch.ones(len(self.rows), past + 1, dtype=torch.long, device=device)
        mask[:, -1] = torch.tensor(active, dtype=torch.long, device=device)  # idle rows are padding: untouched
        t0 = time.perf_counter()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                            use_cache=True).logits[:, -1]
        nxt = logits.argmax(-1).tolist()
        self.stats.decode_s += time.perf_counter() - t0
        self.stats.steps += 1
        self.stats.in_flight.append(sum(active))
        self.stats.kv_bytes.append(self.cache.allocated_bytes())
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.kv_bytes[-1])
        done = []
        for b, s in enumerate(self.rows):
            if s is None:
                continue
            s.tokens.append(nxt[b])
            if s.logits is not None:
                s.logits.append(logits[b])
            if len(s.tokens) >= s.request.max_new_tokens:
                self.stats.generated_tokens += len(s.tokens)
                self.stats.realised_cr.append(self._realised_cr(b, s))
                done.append(self.release(b))
        return done


def _edge_bytes(cache: SlotCache, active: torch.Tensor | None) -> int:
    """Most bytes one decode step can take: a new block for every live pair whose last block is full (or that
    has none), as if every one of them appended. ``active`` (B,): the rows in flight (None: all)."""
    total = 0
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        edge = layer.lens % layer.block_size == 0
        if active is not None:
            edge = edge & active[:, None]
        total += int(edge.sum()) * layer.block_bytes()
    return total


@dataclass
class ServeResult:
    outputs: list[list[int]]  # greedy tokens of each request, in request order
    stats: ServeStats
    logits: list[torch.Tensor] | None = None  # (new tokens, V) per request, with ``record_logits``


def serve(model, requests: list[Request], budget_bytes: int, policy: Policy | None = None, block_size: int = 16,
          progress=None, record_logits: bool = False) -> ServeResult:
    """Generate every request greedily under the budget.

    ``progress``: called with the number of newly finished requests after each step (a tqdm bar's update).
    """
    if not requests:
        return ServeResult([], ServeStats(), [] if record_logits else None)
    server = Server(model, budget_bytes, policy, block_size, record_logits)
    outputs: list[list[int] | None] = [None] * len(requests)
    scores: list[torch.Tensor | None] = [None] * len(requests)
    queue = deque(enumerate(requests))
    staged = None  # a prefilled request waiting for room
    context = nullcontext() if is_compressed(model.config) else policy_attention(model)
    t0 = time.perf_counter()
    with context:
        while queue or staged or any(r is not None for r in server.rows):
            while (queue or staged):  # admit while the budget allows
                if staged is None:
                    index, req = queue.popleft()
                    staged = (index, req, *server.prefill(req))
                index, req, solo, first = staged
                if req.max_new_tokens <= 1:  # the prefill's token is all it asked for
                    outputs[index], staged = [int(first.argmax())][: req.max_new_tokens], None
                    scores[index] = first[None, : req.max_new_tokens]
                    server.stats.generated_tokens += req.max_new_tokens
                    continue
                if not server.admit(index, req, solo, first):
                    break
                staged = None
            if not any(r is not None for r in server.rows):
                index, req, solo, _ = staged
                need = solo.allocated_bytes() + _edge_bytes(solo, None)
                raise BudgetError(
                    f"the KV budget of {budget_bytes / 2**20:.2f} MiB cannot hold one sequence: request {index} "
                    f"({req.prompt.numel()} prompt tokens) needs {need / 2**20:.2f} MiB after its prefill; "
                    "raise --kv-budget or shorten the requests")
            while not server._fits():  # the step's worst case must fit: preempt the newest sequences
                if sum(r is not None for r in server.rows) == 1:
                    raise BudgetError(
                        f"the KV budget of {budget_bytes / 2**20:.2f} MiB cannot hold one sequence to its end; "
                        "raise --kv-budget or shorten the requests")
                slot = server.preempt_newest()
                queue.appendleft((slot.index, slot.request))
            for slot in server.step():
                outputs[slot.index] = slot.tokens
                scores[slot.index] = torch.stack(slot.logits) if slot.logits is not None else None
                if progress:
                    progress(1)
    server.stats.wall_s = time.perf_counter() - t0
    server.stats.final_bytes = server.cache.allocated_bytes()
    return ServeResult(outputs, server.stats, scores if record_logits else None)
