"""The serving engine: continuous batching of requests over one shared paged cache under a KV-memory budget.

Requests wait in a queue. Each is prefilled alone into a cache of its own and, when its slots fit in the budget
beside the sequences in flight, copied into a free row of one shared paged cache; every step decodes one token
for every sequence in flight; a finished (or aborted) sequence's blocks go back to the free list at once and its
row takes the next request. With a compressed cache (DMC, DMS, or an eviction policy) sequences hold fewer
blocks, so more of them fit.

The budget counts the bytes of slot blocks handed out by the allocator (``allocated_bytes``). A request is
admitted when every sequence in flight, itself included, still fits at its end, growing at the CR it has shown
so far (for vanilla, exactly); with nothing in flight, as soon as its prompt fits (it then runs as far as the
budget lets it, finishing with "length" if the budget ends it first). Before each step the engine reserves the worst case of that step (a new block for
every pair at a block boundary, as if all of them appended); if that would not fit (a sequence compressing less
than it did), the newest sequence is preempted: its blocks are freed and it is queued again at the front. When
it is admitted again it is recomputed from its prompt and replays the tokens it already delivered (fed to the
model instead of the ones it samples, its random generator restarted from the same seed), so a client sees
every token once and the cache equals one that never was preempted. The budget holds at every step.

One thread owns the engine: ``submit`` and ``abort`` only post to its inbox and may be called from any
thread; everything else runs on the engine's thread (``run_forever``) or, for a benchmark, in the caller's
(``run_until_done``). Results leave through each request's ``sink``, called on the engine's thread.

The vanilla model runs on the same paged storage with every token appended (``KeepAll``), so the ratio to it
isolates the compression.
"""

from __future__ import annotations

import math
import queue
import random
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from dmc.eval.policies import KeepAll, Policy, PolicyCache, policy_attention
from dmc.methods import is_compressed
from dmc.methods import new_cache as method_cache
from dmc.slot_cache import SlotCache

from .sampling import SamplingParams, logprobs_of, sample


class BudgetError(ValueError):
    """The budget cannot hold one sequence; the message says how much one needs."""


# ---- what a request gets back (through its sink, on the engine's thread) -----------------------------------
@dataclass
class TokenEvent:
    request_id: object
    token: int
    logprob: float | None = None  # with ``logprobs``: the chosen token's log-probability
    top: list[tuple[int, float]] | None = None  # with ``logprobs`` k > 0: the k most likely (id, log-probability)
    logits: torch.Tensor | None = None  # (V,) the logits it was drawn from, when the engine records them


@dataclass
class FinishEvent:
    request_id: object
    reason: str  # "length" (max_tokens), "stop" (a stop token), "abort"
    prompt_tokens: int
    completion_tokens: int
    realised_cr: float | None = None  # tokens fed / mean live slots at the end (None: aborted)


@dataclass
class ErrorEvent:
    request_id: object
    status: int  # the HTTP status the server answers with (413: the budget can never hold it; 500: our fault)
    message: str


Event = TokenEvent | FinishEvent | ErrorEvent


@dataclass
class Request:
    request_id: object
    prompt: torch.Tensor  # (T,) token ids
    params: SamplingParams
    sink: Callable[[Event], None] | None = None


# ---- the engine's counters -----------------------------------------------------------------------------------
@dataclass
class ServeStats:
    """Running totals (a server runs for days: nothing here grows with the number of steps or requests)."""

    generated_tokens: int = 0  # tokens delivered (the prefill's first token included; replays not counted twice)
    discarded_tokens: int = 0  # tokens of preempted sequences, recomputed later
    steps: int = 0  # decode steps (one token for every sequence in flight)
    wall_s: float = 0.0
    in_flight_sum: int = 0  # sequences in flight, summed over the steps
    max_in_flight: int = 0
    kv_bytes_sum: int = 0  # slot bytes handed out after each step, summed over the steps
    decode_s: float = 0.0  # time in decode steps (the rest of wall_s: prefills and bookkeeping)
    peak_bytes: int = 0  # most slot bytes handed out at any point (after admission, after each step)
    preempted: int = 0
    final_bytes: int = 0  # slot bytes still handed out when every request is done (0: every block freed)
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    prompt_tokens: int = 0  # of the requests admitted (a recompute after preemption not counted again)
    realised_cr_sum: float = 0.0  # each finished sequence's tokens fed / mean live slots, summed
    fed_tokens: int = 0  # tokens the finished sequences put through their cache
    layer_slots: list[float] = field(default_factory=list)  # per layer: the finished sequences' mean live slots, summed

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.wall_s if self.wall_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second of the decode steps alone (one per sequence in flight per step)."""
        return self.in_flight_sum / self.decode_s if self.decode_s else 0.0

    @property
    def mean_kv_bytes(self) -> float:
        return self.kv_bytes_sum / self.steps if self.steps else 0.0

    @property
    def mean_realised_cr(self) -> float:
        """The finished sequences' realised CR, averaged over sequences."""
        return self.realised_cr_sum / self.finished if self.finished else 1.0

    @property
    def mean_in_flight(self) -> float:
        return self.in_flight_sum / self.steps if self.steps else 0.0

    def layer_cr(self) -> list[float]:
        """Per layer, the finished sequences' tokens fed over their live slots (token-weighted)."""
        return [self.fed_tokens / s if s else 1.0 for s in self.layer_slots]


@dataclass
class Gauges:
    """The engine's state after its last iteration, for a reader on another thread (a fresh object each time,
    so a reader never sees one half-written)."""

    in_flight: int = 0
    queued: int = 0
    kv_bytes: int = 0
    reserved_bytes: int = 0
    tokens_per_s: float = 0.0  # generated tokens per second over the last ``RATE_WINDOW_S``


RATE_WINDOW_S = 10.0
DEAD_AFTER = 5  # iterations failing in a row, none served between: the engine is declared dead


def new_cache(model, policy: Policy | None, block_size: int) -> SlotCache:
    """A DMC or DMS model's own cache; a vanilla Llama's policy cache (``KeepAll``: every token kept)."""
    if is_compressed(model.config):
        if policy is not None:
            raise ValueError("an eviction policy runs on a vanilla Llama, not on a DMC or DMS model")
        return method_cache(model.config, block_size=block_size)
    return PolicyCache(model.config, policy or KeepAll(), block_size=block_size)


def model_context(model, policy: Policy | None):
    """What the model runs under while the engine serves: a vanilla Llama's attention swapped for the policy's."""
    return nullcontext() if is_compressed(model.config) else policy_attention(model)


@dataclass
class _Seq:
    """A request as the engine holds it: tokens generated so far, and what a recompute must replay."""

    request: Request
    order: int  # submission order: preemption takes the newest
    seed: int
    tokens: list[int] = field(default_factory=list)
    replay: list[int] = field(default_factory=list)  # tokens delivered before a preemption, fed again
    generator: torch.Generator | None = None
    admitted_at: int = 0
    held: TokenEvent | None = None  # the prefill's token, sent when the sequence is admitted (or ends there)

    @property
    def prompt_len(self) -> int:
        return self.request.prompt.numel()

    def remaining(self) -> int:
        return self.request.params.max_tokens - len(self.tokens)

    def restart(self, device) -> None:
        """Back to the prompt (a new admission or a preemption): the random stream from its seed again."""
        self.replay = self.replay if len(self.replay) > len(self.tokens) else self.tokens
        self.tokens = []
        self.generator = torch.Generator(device=device).manual_seed(self.seed)


class Engine:
    """The shared cache, the rows of the sequences in flight, the queue (see the module docstring)."""

    def __init__(self, model, budget_bytes: int, policy: Policy | None = None, block_size: int = 16,
                 max_seqs: int | None = None, record_logits: bool = False):
        if policy is not None and policy.history:
            raise ValueError(f"{policy.name} keeps a per-step attention history, which continuous batching "
                             "does not carry across rows yet; use h2o, tova, streaming_llm or keep_all")
        self.model, self.budget, self.policy, self.block_size = model, budget_bytes, policy, block_size
        self.max_seqs = max_seqs
        self.record_logits = record_logits
        self.cache = new_cache(model, policy, block_size)
        self.rows: list[_Seq | None] = []
        self.stats = ServeStats(layer_slots=[0.0] * model.config.num_hidden_layers)
        self.gauges = Gauges()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[_Seq] = deque()
        self._staged: tuple[_Seq, SlotCache] | None = None  # prefilled, waiting for room
        self._order = 0
        self._rate: deque[tuple[float, int]] = deque()
        self.dead: str | None = None  # set (once, by the engine's thread) when it can no longer serve
        self._failures = 0  # iterations failed in a row

    # ---- any thread ----------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        self._inbox.put(("submit", request))

    def abort(self, request_id) -> None:
        """Drop a request wherever it is; its blocks are freed before the next step."""
        self._inbox.put(("abort", request_id))

    def pending(self) -> int:
        """Messages posted and not yet taken (about: another thread may be posting)."""
        return self._inbox.qsize()

    # ---- the engine's thread -----------------------------------------------------------------------------
    def busy(self) -> bool:
        return bool(self._waiting or self._staged or any(self.rows))

    def run_forever(self, stop: threading.Event, idle_wait_s: float = 0.05) -> None:
        """Serve until ``stop``. An error fails what the engine holds and it goes on; an error while doing that
        (the device is gone) ends it, with ``dead`` saying why, so that the server can answer 503."""
        with model_context(self.model, self.policy):
            while not stop.is_set():
                try:
                    if not self.busy() and not self._take_inbox(block_s=idle_wait_s):
                        self._publish_gauges()  # idle: tokens/s falls to 0
                        continue
                    self.iterate()
                    self._failures = 0
                except Exception:  # noqa: BLE001 - a bug must not take the server down: fail what is in flight
                    reason = _last_error()
                    self._failures += 1
                    try:
                        self._fail_all(500, f"the engine failed while serving this request: {reason}")
                        self._probe_device()
                        if self._failures >= DEAD_AFTER:
                            raise RuntimeError(f"{DEAD_AFTER} iterations in a row failed")
                    except Exception:  # noqa: BLE001 - the device (or the engine) is gone: say so and stop
                        self.dead = f"the engine stopped: {reason}"
                        self._tell_all(503, f"{self.dead}; restart the server")
                        return

    def run_until_done(self) -> None:
        """Serve every submitted request to its end in this thread (a benchmark)."""
        t0 = time.perf_counter()
        with model_context(self.model, self.policy):
            self._take_inbox()
            while self.busy():
                self.iterate()
                self._take_inbox()
        self.stats.wall_s += time.perf_counter() - t0
        self.stats.final_bytes = self.cache.allocated_bytes()

    def iterate(self) -> None:
        """Messages, admissions while the budget allows, preemptions while the step's worst case does not fit,
        then one decode step."""
        self._take_inbox()
        self._admit_waiting()
        while any(self.rows) and not self._fits():
            live = [(b, s) for b, s in enumerate(self.rows) if s is not None]
            if len(live) == 1:  # the budget is this sequence's limit: it ends here, as at max_tokens
                self._finish(live[0][1], live[0][0], None, reason="length")
                continue
            self._preempt_newest()
        if any(self.rows):
            self._decode_step()
        self._compact()
        self._publish_gauges()

    # ---- inbox --------------------------------------------------------------------------------------------
    def _take_inbox(self, block_s: float | None = None) -> bool:
        """Apply every message posted so far (waiting up to ``block_s`` for the first); whether any came."""
        got = False
        while True:
            try:
                kind, item = self._inbox.get(timeout=block_s) if block_s and not got else self._inbox.get_nowait()
            except queue.Empty:
                return got
            got = True
            if kind == "submit":
                self._order += 1
                seed = item.params.seed if item.params.seed is not None else random.getrandbits(63)
                self._waiting.append(_Seq(item, self._order, seed))
            else:
                self._abort(item)

    def _abort(self, request_id) -> None:
        for b, seq in enumerate(self.rows):
            if seq is not None and seq.request.request_id == request_id:
                self._release(b)
                return self._finish_aborted(seq)
        if self._staged is not None and self._staged[0].request.request_id == request_id:
            seq, self._staged = self._staged[0], None
            return self._finish_aborted(seq)
        for seq in self._waiting:
            if seq.request.request_id == request_id:
                self._waiting.remove(seq)
                return self._finish_aborted(seq)

    def _finish_aborted(self, seq: _Seq) -> None:
        self.stats.aborted += 1
        _emit(seq, FinishEvent(seq.request.request_id, "abort", seq.prompt_len, max(len(seq.tokens), len(seq.replay))))

    # ---- memory -------------------------------------------------------------------------------------------
    def _active(self) -> torch.Tensor:
        return torch.tensor([r is not None for r in self.rows], dtype=torch.bool, device=self.model.device)

    def _fits(self, solo: SlotCache | None = None) -> bool:
        """Whether the slots in flight (and ``solo``'s, to be admitted) plus the next step's worst case fit."""
        held = self.cache.allocated_bytes() + _edge_bytes(self.cache, self._active())
        if solo is not None:
            held += solo.allocated_bytes() + _edge_bytes(solo, None)
        return held <= self.budget

    def _growth_bytes(self, cache: SlotCache, rows: list[tuple[int, _Seq]]) -> int:
        """Bytes the sequences ``rows`` ((row in ``cache``, sequence)) will take to their end if they go on
        compressing as they have so far (each pair's remaining tokens over the sequence's realised CR):
        admission's watermark, so that a new sequence does not at once preempt the ones in flight."""
        total = 0
        for b, seq in rows:
            fed = seq.prompt_len + len(seq.tokens) - 1
            lens = torch.stack([layer.lens[b] for layer in cache.layers])  # (L, H_kv)
            cr = fed / max(float(lens.float().mean()), 1.0)
            grow = math.ceil(seq.remaining() / cr)
            bs = self.block_size
            blocks = (-(-(lens + grow) // bs)) - (-(-lens // bs))
            total += int(blocks.sum()) * cache.layers[0].block_bytes()
        return total

    # ---- admission, release, preemption -------------------------------------------------------------------
    def _admit_waiting(self) -> None:
        while self._waiting or self._staged:
            if self._staged is None:
                seq = self._waiting.popleft()
                try:
                    self._staged = (seq, self._prefill(seq))
                except Exception:  # noqa: BLE001 - this request's failure, not the others'
                    self._fail(seq, 500, f"the prefill of this request failed: {_last_error()}")
                    continue
            seq, solo = self._staged
            if seq.remaining() <= 0 or self._stopped(seq):  # the prefill's token is all it gets
                self._staged = None
                self._finish(seq, None, solo)
                continue
            if self.max_seqs is not None and sum(r is not None for r in self.rows) >= self.max_seqs:
                return
            alone = not any(self.rows)
            if self._admit(seq, solo, project=not alone):
                self._staged = None
                continue
            if alone:  # its prompt alone does not fit: it never will
                need = solo.allocated_bytes() + _edge_bytes(solo, None)
                self._staged = None
                self._fail(seq, 413, f"the KV budget of {_mib(self.budget)} cannot hold one sequence: this "
                           f"request's {seq.prompt_len} prompt tokens need {_mib(need)} after their prefill; raise "
                           "--kv-budget or shorten the prompt")
                continue
            return

    @torch.no_grad()
    def _prefill(self, seq: _Seq) -> SlotCache:
        """The request's prompt alone in a cache of its own; its first token sampled (or replayed)."""
        if not seq.tokens and not seq.replay:
            self.stats.prompt_tokens += seq.prompt_len
        seq.restart(self.model.device)
        solo = new_cache(self.model, self.policy, self.block_size)
        ids = seq.request.prompt.to(self.model.device)[None]
        logits = self.model(ids, past_key_values=solo, use_cache=True, logits_to_keep=1).logits[0, -1]
        seq.held = self._take_token(seq, logits, send=False)  # a request the budget cannot hold gets no token
        return solo

    def _admit(self, seq: _Seq, solo: SlotCache, project: bool = True) -> bool:
        """Copy a prefilled sequence into a free row if it fits beside the sequences in flight, all of them
        growing to their end at the CR they show so far (vanilla: exactly what they will need). Alone
        (``project`` False) it needs only to fit now: it runs as far as the budget lets it."""
        if project:
            live = [(b, s) for b, s in enumerate(self.rows) if s is not None]
            held = self.cache.allocated_bytes() + solo.allocated_bytes()
            held += self._growth_bytes(self.cache, live) + self._growth_bytes(solo, [(0, seq)])
            if held > self.budget:
                return False
        if not self._fits(solo):
            return False
        row = self._free_row()
        for layer, other in zip(self.cache.layers, solo.layers):
            layer.insert_sequence(row, other, 0)
            layer.seen_tokens = max(layer.seen_tokens, other.seen_tokens)
        seq.admitted_at = self.stats.steps
        self.rows[row] = seq
        self._send_held(seq)
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.cache.allocated_bytes())
        return True

    def _free_row(self) -> int:
        if None in self.rows:
            return self.rows.index(None)
        for layer in self.cache.layers:
            if not layer.is_initialized:
                layer._init_state(0, self.model.dtype, self.model.device)
            layer.add_sequences(1)
        self.rows.append(None)
        return len(self.rows) - 1

    def _release(self, row: int) -> _Seq:
        for layer in self.cache.layers:
            layer.release_sequence(row)
        seq, self.rows[row] = self.rows[row], None
        return seq

    def _compact(self, least: int = 8) -> None:
        """Drop idle rows when they are most of the batch (every step runs every row, idle ones as padding):
        after a burst, a few sequences should not decode at the burst's batch size."""
        live = [b for b, s in enumerate(self.rows) if s is not None]
        if len(self.rows) < least or 2 * len(live) > len(self.rows):
            return
        index = torch.tensor(live, dtype=torch.long, device=self.model.device)
        for layer in self.cache.layers:
            if layer.is_initialized:
                layer.keep_sequences(index)  # the table's rows only: no block moves, nothing the size of a pool
        self.rows = [self.rows[b] for b in live]

    def _preempt_newest(self) -> None:
        _, row = max((s.order, b) for b, s in enumerate(self.rows) if s is not None)
        seq = self._release(row)
        self.stats.preempted += 1
        self.stats.discarded_tokens += len(seq.tokens)
        self._waiting.appendleft(seq)

    # ---- tokens -------------------------------------------------------------------------------------------
    def _take_token(self, seq: _Seq, logits: torch.Tensor, send: bool = True) -> TokenEvent | None:
        """Sample the next token from ``logits`` (V,); during a replay, feed the delivered one instead (the
        draw still advances the generator, so the random stream stays where it was). A new token's event goes
        out (``send``) or is returned."""
        params = seq.request.params
        token = sample(logits, params, seq.generator)
        position = len(seq.tokens)
        if position < len(seq.replay):
            seq.tokens.append(seq.replay[position])
            return None
        seq.tokens.append(token)
        lp, top = logprobs_of(logits, token, params.logprobs) if params.logprobs is not None else (None, None)
        event = TokenEvent(seq.request.request_id, token, lp, top, logits if self.record_logits else None)
        if send:
            self._deliver(seq, event)
        return event

    def _send_held(self, seq: _Seq) -> None:
        if seq.held is not None:
            self._deliver(seq, seq.held)
            seq.held = None

    def _deliver(self, seq: _Seq, event: TokenEvent) -> None:
        self.stats.generated_tokens += 1
        _emit(seq, event)

    def _stopped(self, seq: _Seq) -> str | None:
        if seq.tokens[-1] in seq.request.params.stop_token_ids and len(seq.tokens) > len(seq.replay):
            return "stop"
        return "length" if seq.remaining() <= 0 else None

    @torch.no_grad()
    def _decode_step(self) -> None:
        """One token for every sequence in flight; finished sequences leave at once."""
        device = self.model.device
        active = [s is not None for s in self.rows]
        # Every layer's length is the longest live sequence's (the mask the model builds has that many columns):
        # it would otherwise only grow, by one each step, for as long as the server runs.
        seen = max(s.prompt_len + len(s.tokens) - 1 for s in self.rows if s is not None)
        for layer in self.cache.layers:
            layer.seen_tokens = seen
        ids = torch.tensor([[s.tokens[-1] if s else 0] for s in self.rows], device=device)
        pos = torch.tensor([[s.prompt_len + len(s.tokens) - 1 if s else 0] for s in self.rows], device=device)
        mask = torch.ones(len(self.rows), self.cache.get_seq_length() + 1, dtype=torch.long, device=device)
        mask[:, -1] = torch.tensor(active, dtype=torch.long, device=device)  # idle rows are padding: untouched
        t0 = time.perf_counter()
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                            use_cache=True).logits[:, -1]
        self.stats.decode_s += time.perf_counter() - t0
        held = self.cache.allocated_bytes()
        self.stats.steps += 1
        self.stats.in_flight_sum += sum(active)
        self.stats.max_in_flight = max(self.stats.max_in_flight, sum(active))
        self.stats.kv_bytes_sum += held
        self.stats.peak_bytes = max(self.stats.peak_bytes, held)
        for b, seq in enumerate(self.rows):
            if seq is None:
                continue
            self._take_token(seq, logits[b])
            if self._stopped(seq):
                self._finish(seq, b, None)

    def _finish(self, seq: _Seq, row: int | None, solo: SlotCache | None, reason: str | None = None) -> None:
        """A sequence at its end (in row ``row`` of the shared cache, or still alone in ``solo``): its realised
        CR recorded, its blocks freed, its finish sent."""
        cache, b = (self.cache, row) if row is not None else (solo, 0)
        fed = seq.prompt_len + len(seq.tokens) - 1  # the last token is generated, not yet fed
        per_layer = [float(layer.lens[b].float().mean()) for layer in cache.layers]
        cr = fed / max(sum(per_layer) / len(per_layer), 1.0)
        self.stats.realised_cr_sum += cr
        self.stats.layer_slots = [a + s for a, s in zip(self.stats.layer_slots, per_layer)]  # before fed_tokens:
        self.stats.fed_tokens += fed  # a reader never sees tokens without their slots
        self.stats.finished += 1
        if row is not None:
            self._release(row)
        self._send_held(seq)
        reason = reason or self._stopped(seq) or "length"
        _emit(seq, FinishEvent(seq.request.request_id, reason, seq.prompt_len, len(seq.tokens), cr))

    def _fail(self, seq: _Seq, status: int, message: str) -> None:
        for b, s in enumerate(self.rows):
            if s is seq:
                self._release(b)
        self.stats.failed += 1
        _emit(seq, ErrorEvent(seq.request.request_id, status, message))

    def _fail_all(self, status: int, message: str) -> None:
        """After an unexpected error: every request held fails (told first, so that nobody waits on a reset that
        fails too), then the engine starts clean with a fresh cache."""
        for seq in self._held():
            self.stats.failed += 1
            _emit(seq, ErrorEvent(seq.request.request_id, status, message))
        self.rows, self._waiting, self._staged = [], deque(), None
        self.cache = new_cache(self.model, self.policy, self.block_size)
        self._publish_gauges()

    def _probe_device(self) -> None:
        """A tiny computation on the model's device: raises when the device is lost (a sticky CUDA error), which
        a fresh cache (allocated lazily) would not show."""
        device = self.model.device
        torch.ones(1, device=device).add(1).sum().item()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _held(self) -> list[_Seq]:
        """Every sequence the engine holds: in flight, prefilled and waiting for room, queued."""
        staged = [self._staged[0]] if self._staged else []
        return [s for s in self.rows if s is not None] + list(self._waiting) + staged

    def _tell_all(self, status: int, message: str) -> None:
        """Send every request held (in flight, prefilled, waiting, in the inbox) an error, touching nothing but
        their sinks: the engine can no longer be trusted with its cache."""
        held = [s.request for s in self._held()]
        while True:
            try:
                kind, item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                held.append(item)
        for request in held:
            if request.sink is not None:
                request.sink(ErrorEvent(request.request_id, status, message))

    def _publish_gauges(self) -> None:
        now = time.monotonic()
        self._rate.append((now, self.stats.generated_tokens))
        while len(self._rate) > 2 and now - self._rate[1][0] > RATE_WINDOW_S:
            self._rate.popleft()
        (t0, n0), (t1, n1) = self._rate[0], self._rate[-1]
        self.gauges = Gauges(
            in_flight=sum(r is not None for r in self.rows),
            queued=len(self._waiting) + (self._staged is not None),
            kv_bytes=self.cache.allocated_bytes(),
            reserved_bytes=self.cache.reserved_bytes(),
            tokens_per_s=(n1 - n0) / (t1 - t0) if t1 > t0 else 0.0,
        )


def _emit(seq: _Seq, event: Event) -> None:
    if seq.request.sink is not None:
        seq.request.sink(event)


def _last_error() -> str:
    """The exception being handled, in one line (its type and message)."""
    return traceback.format_exc(limit=-1).strip().splitlines()[-1]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


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
