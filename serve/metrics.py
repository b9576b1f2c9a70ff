"""``/metrics``: the engine's gauges and counters in Prometheus's text format (version 0.0.4)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render(engine: Engine, model_name: str) -> str:
    g, s = engine.gauges, engine.stats  # published by the engine's thread; read, never written, here
    label = f'model_name="{_escape(model_name)}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value, extra: str = "") -> None:
        if not lines or not lines[-1].startswith(f"{name}{{"):
            lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.append(f"{name}{{{label}{extra}}} {value}")

    metric("dmc_kv_bytes_in_use", "gauge", "Bytes of KV slot blocks handed out by the allocator.", g.kv_bytes)
    metric("dmc_kv_bytes_reserved", "gauge", "Bytes of the KV pools as reserved, blocks free or not, with per-slot "
           "state.", g.reserved_bytes)
    metric("dmc_kv_budget_bytes", "gauge", "The KV budget: slot bytes the engine may hand out.", engine.budget)
    metric("dmc_kv_bytes_peak", "gauge", "Most slot bytes handed out at any point since the start.", s.peak_bytes)
    metric("dmc_sequences_in_flight", "gauge", "Sequences decoding in the shared cache.", g.in_flight)
    metric("dmc_sequences_in_flight_max", "gauge", "Most sequences in flight at any decode step since the start.",
           s.max_in_flight)
    metric("dmc_sequences_queued", "gauge", "Sequences waiting for room (submitted, prefilled or preempted).",
           g.queued + engine.pending())
    metric("dmc_generation_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
           f"{g.tokens_per_s:.3f}")
    metric("dmc_realised_cr", "gauge", "Tokens fed over live KV slots of the finished sequences (1: no "
           "compression).", f"{s.fed_tokens / (sum(s.layer_slots) / len(s.layer_slots)):.4f}"
           if s.fed_tokens and sum(s.layer_slots) else "1")
    for i, cr in enumerate(s.layer_cr()):
        metric("dmc_layer_realised_cr", "gauge", "Realised CR of each layer over the finished sequences.",
               f"{cr:.4f}", f',layer="{i}"')
    metric("dmc_decode_steps_total", "counter", "Decode steps (one token for every sequence in flight).", s.steps)
    metric("dmc_sequence_steps_total", "counter", "Sequences in flight, summed over the decode steps (its rate over "
           "the steps' rate: the mean batch).", s.in_flight_sum)
    metric("dmc_generation_tokens_total", "counter", "Tokens generated and delivered.", s.generated_tokens)
    metric("dmc_prompt_tokens_total", "counter", "Prompt tokens of the admitted requests.", s.prompt_tokens)
    metric("dmc_preemptions_total", "counter", "Sequences preempted to keep the budget (recomputed later).",
           s.preempted)
    metric("dmc_recomputed_tokens_total", "counter", "Tokens of preempted sequences, computed again.",
           s.discarded_tokens)
    metric("dmc_requests_finished_total", "counter", "Sequences that ran to a stop or their length.", s.finished)
    metric("dmc_requests_aborted_total", "counter", "Sequences dropped before their end (client gone, stop "
           "string).", s.aborted)
    metric("dmc_requests_failed_total", "counter", "Sequences answered with an error.", s.failed)
    return "\n".join(lines) + "\n"


def parse(text: str) -> dict[str, float]:
    """A scrape back to numbers: each metric's first sample by name (``dmc_layer_realised_cr`` and other labelled
    series under ``name{labels}`` as well)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        out.setdefault(series.split("{")[0], float(value))
        out[series] = float(value)
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
