"""``dmc bench-serve``: the serving benchmark, in the manner of vLLM's ``benchmark_serving``. For each model it
starts ``dmc serve`` under the same KV budget, sends the same mixed-length requests from concurrent streaming
HTTP clients on loopback (closed loop, or at a request rate), and reports time to first token, inter-token
latency (p50/p99), end-to-end latency, output tokens/s, and sequences in flight (sampled from ``/metrics``).

Models: the folders given (vanilla, DMC, DMS), plus, for a vanilla first folder, DMC retrofits of it with a
synthetic CR (``--crs``: the vanilla weights, decisions calibrated to merge at that ratio; their text is
meaningless, their cache behaves like a trained model's at that CR, as in ``dmc bench``). Requests ask for
``ignore_eos``, so every model generates the same number of tokens."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass
class Result:
    """One request as its client saw it."""

    prompt_tokens: int
    output_tokens: int = 0
    ttft_s: float = math.nan
    itl_s: list[float] = field(default_factory=list)  # gaps between consecutive tokens
    latency_s: float = math.nan
    error: str | None = None


@dataclass
class Row:
    model: str
    budget_bytes: int
    requests: int
    failed: int
    duration_s: float
    output_tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    latency_p50_s: float
    in_flight_mean: float  # sequences in flight per decode step, from the server's counters over the load
    in_flight_max: float  # the most at any step since the server started (the warm-up's one included)
    peak_kv_bytes: float
    realised_cr: float
    preemptions: float
    in_flight_ratio: float = 1.0  # over the first model's (vanilla)
    tokens_per_s_ratio: float = 1.0


async def _one(client, url: str, model: str, prompt: list[int], max_tokens: int) -> Result:
    result = Result(len(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    result.error = event["error"]["message"]
                    return result
                if event["choices"][0]["finish_reason"] is not None:
                    continue  # the closing event, not a token
                now = time.perf_counter()
                if result.output_tokens == 0:
                    result.ttft_s = now - start
                else:
                    result.itl_s.append(now - last)
                last = now
                result.output_tokens += 1
    except Exception as err:  # noqa: BLE001 - a transport failure is a failed request, reported, not a crash
        result.error = f"{type(err).__name__}: {err}"
        return result
    result.latency_s = time.perf_counter() - start
    if result.output_tokens != max_tokens:
        result.error = f"{result.output_tokens} of {max_tokens} tokens"
    return result


async def _sample_metrics(client, url: str, samples: list[dict], stop: asyncio.Event, every_s: float) -> None:
    from .metrics import parse

    while not stop.is_set():
        try:
            samples.append(parse((await client.get(f"{url}/metrics")).text))
        except Exception:  # noqa: BLE001 - a missed sample is not a failed benchmark
            pass
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


async def run_load(url: str, model: str, requests: list[tuple[list[int], int]], clients: int,
                   request_rate: float = math.inf, seed: int = 0, progress=None) -> tuple[list[Result], float, list]:
    """Every request through ``clients`` concurrent streaming clients (closed loop), each request released at
    ``request_rate`` per second (Poisson arrivals; inf: all at once). (results in request order, seconds,
    /metrics scrapes: before the load, every 0.25 s during it, after it)."""
    import httpx

    from .metrics import parse

    rng = random.Random(seed)
    queue: asyncio.Queue = asyncio.Queue()
    results: list[Result | None] = [None] * len(requests)
    samples: list[dict] = []
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def release():
            for i in range(len(requests)):
                queue.put_nowait(i)
                if math.isfinite(request_rate):
                    await asyncio.sleep(rng.expovariate(request_rate))

        async def worker():
            while True:
                i = await queue.get()
                if i is None:
                    return
                results[i] = await _one(client, url, model, *requests[i])
                if progress:
                    progress()

        samples.append(parse((await client.get(f"{url}/metrics")).text))
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample_metrics(client, url, samples, stop, 0.25))
        start = time.perf_counter()
        workers = [asyncio.create_task(worker()) for _ in range(clients)]
        await release()
        while any(r is None for r in results):
            await asyncio.sleep(0.05)
        duration = time.perf_counter() - start
        for _ in workers:
            queue.put_nowait(None)
        await asyncio.gather(*workers)
        stop.set()
        await sampler
        samples.append(parse((await client.get(f"{url}/metrics")).text))
    return results, duration, samples


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def summarize(label: str, budget: int, results: list[Result], duration: float, samples: list[dict]) -> Row:
    ok = [r for r in results if r.error is None]
    itl = [g for r in ok for g in r.itl_s]
    first, final = samples[0], samples[-1]
    steps = final["dmc_decode_steps_total"] - first["dmc_decode_steps_total"]
    mean_batch = (final["dmc_sequence_steps_total"] - first["dmc_sequence_steps_total"]) / steps if steps else 0.0
    most = final["dmc_sequences_in_flight_max"]
    return Row(label, budget, len(results), len(results) - len(ok), duration,
               sum(r.output_tokens for r in ok) / duration, len(ok) / duration,
               1e3 * _pct([r.ttft_s for r in ok], 50), 1e3 * _pct([r.ttft_s for r in ok], 99),
               1e3 * _pct(itl, 50), 1e3 * _pct(itl, 99), _pct([r.latency_s for r in ok], 50),
               mean_batch, most,
               final.get("dmc_kv_bytes_peak", math.nan), final.get("dmc_realised_cr", math.nan),
               final.get("dmc_preemptions_total", math.nan))


HEADER = ("| model | CR | requests (failed) | in flight mean (max) | × first | output tok/s | × first | TTFT p50 / p99 "
          "(ms) | ITL p50 / p99 (ms) | latency p50 (s) | peak KV (MiB) | preempted |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(r: Row) -> str:
    return (f"| {r.model} | {r.realised_cr:.2f} | {r.requests} ({r.failed}) | {r.in_flight_mean:.1f} "
            f"({r.in_flight_max:.0f}) | {r.in_flight_ratio:.2f} | {r.output_tokens_per_s:.1f} | "
            f"{r.tokens_per_s_ratio:.2f} | {r.ttft_p50_ms:.0f} / {r.ttft_p99_ms:.0f} | {r.itl_p50_ms:.0f} / "
            f"{r.itl_p99_ms:.0f} | {r.latency_p50_s:.1f} | {r.peak_kv_bytes / 2**20:.2f} | {r.preemptions:.0f} |")


def plot(curves: dict[str, list[tuple[float, float]]], rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label, points in curves.items():
        ax1.plot([t for t, _ in points], [n for _, n in points], label=label)
    ax1.set(xlabel="seconds", ylabel="sequences in flight", title="sequences in flight (sampled from /metrics)")
    ax1.legend(fontsize=7)
    ax2.bar([r.model for r in rows], [r.output_tokens_per_s for r in rows])
    ax2.set(ylabel="output tokens/s", title="throughput at the same KV budget")
    ax2.tick_params(axis="x", labelrotation=20, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def synthetic_folders(vanilla: str, crs: list[float], root: Path, dtype: str) -> list[tuple[str, Path]]:
    """DMC retrofits of ``vanilla`` with a synthetic CR each, saved as folders ``dmc serve`` loads."""
    import copy

    import dmc
    from dmc.eval.bench import prompts
    from dmc.eval.synthetic import impose_synthetic_cr
    from dmc.export import save_folder
    from dmc.generate import load

    model, tok = load(vanilla, dtype)
    calibration = prompts(tok, 2, 256)
    out = []
    for cr in crs:
        dmc_model = dmc.retrofit(copy.deepcopy(model), dmc.DMCConfig(target_cr=cr)).eval()
        got = impose_synthetic_cr(dmc_model, cr, calibration)
        print(f"synthetic dmc {cr:g}x: decisions calibrated, realised {got:.2f}x on the calibration text",
              file=sys.stderr)
        folder = save_folder(dmc_model, root / f"dmc-synthetic-{cr:g}x", vanilla, dtype=dtype)
        out.append((f"dmc synthetic {cr:g}x", folder))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="dmc bench-serve", description="the serving benchmark: each model behind "
                                 "`dmc serve` at one KV budget, driven by concurrent streaming HTTP clients")
    ap.add_argument("models", nargs="+", help="HF folders (the first is the baseline of the ratios)")
    ap.add_argument("--crs", type=float, nargs="*", default=[], help="also DMC retrofits of the first (vanilla) "
                    "folder with these synthetic CRs")
    budget = ap.add_mutually_exclusive_group(required=True)
    budget.add_argument("--kv-budget", type=float, metavar="GiB", help="the KV budget of every server")
    budget.add_argument("--budget-seqs", type=float, help="the budget as this many vanilla sequences of --context "
                        "tokens")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (closed loop)")
    ap.add_argument("--request-rate", type=float, default=math.inf, help="requests per second, Poisson (default: "
                    "all at once, bounded by --clients)")
    ap.add_argument("--context", type=int, default=192, help="longest request: prompt + output tokens")
    ap.add_argument("--out-tokens", type=int, nargs=2, default=(16, 48), metavar=("MIN", "MAX"))
    ap.add_argument("--threads", type=int, default=None, help="the servers' CPU threads")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="folder for serve_bench.json, serve_bench.md and a plot")
    ns = ap.parse_args(argv)
    if ns.requests < 1 or ns.clients < 1:
        sys.exit("dmc bench-serve: error: --requests and --clients must be at least 1")

    import torch
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from dmc.eval.throughput import budget_bytes, make_requests
    from dmc.hub import model_config

    from .launch import dmc_serve

    tok = AutoTokenizer.from_pretrained(ns.models[0])
    config = model_config(ns.models[0], "model")
    try:
        reqs = make_requests(tok, ns.requests, ns.context, tuple(ns.out_tokens), seed=ns.seed)
    except ValueError as err:
        sys.exit(f"dmc bench-serve: error: {err}")
    requests = [(r.prompt.tolist(), r.max_new_tokens) for r in reqs]
    budget = int(ns.kv_budget * 2**30) if ns.kv_budget else budget_bytes(config, ns.budget_seqs, ns.context,
                                                                       ns.block_size, getattr(torch, ns.dtype))
    rows, curves = [], {}
    with tempfile.TemporaryDirectory(prefix="dmc-bench-serve-") as tmp:
        targets = [(Path(m).name, Path(m)) for m in ns.models]
        if ns.crs:
            targets += synthetic_folders(ns.models[0], ns.crs, Path(tmp), ns.dtype)
        for label, folder in targets:
            args = [folder, "--kv-budget", repr(budget / 2**30), "--dtype", ns.dtype, "--block-size", ns.block_size,
                    "--served-model-name", "bench", "--max-model-len", ns.context]
            args += ["--threads", ns.threads] if ns.threads else []
            with dmc_serve(*args, log=Path(tmp) / f"{label}.log") as (url, _):
                bar = tqdm(total=len(requests), desc=f"dmc bench-serve: {label}", unit="req", file=sys.stderr)
                asyncio.run(run_load(url, "bench", requests[:1], 1))  # warm-up: first-call costs out of the figures
                results, duration, samples = asyncio.run(run_load(url, "bench", requests, ns.clients,
                                                                  ns.request_rate, ns.seed, bar.update))
                bar.close()
            row = summarize(label, budget, results, duration, samples)
            if rows:
                row.in_flight_ratio = row.in_flight_mean / rows[0].in_flight_mean if rows[0].in_flight_mean else 0
                row.tokens_per_s_ratio = row.output_tokens_per_s / rows[0].output_tokens_per_s
            rows.append(row)
            curves[label] = [(0.25 * i, s.get("dmc_sequences_in_flight", 0)) for i, s in enumerate(samples[1:-1])]
            failed = next((r.error for r in results if r.error), None)
            if failed:
                print(f"{label}: {row.failed} requests failed, e.g. {failed}", file=sys.stderr)
    table = "\n".join([HEADER, *map(format_row, rows)])
    print(f"KV budget {budget / 2**20:.2f} MiB, {ns.requests} requests, {ns.clients} clients\n{table}")
    if ns.out:
        ns.out.mkdir(parents=True, exist_ok=True)
        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(ns).items()}
        settings["request_rate"] = None if math.isinf(ns.request_rate) else ns.request_rate
        (ns.out / "serve_bench.json").write_text(json.dumps(
            {"settings": settings, "budget_bytes": budget, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
        (ns.out / "serve_bench.md").write_text(table + "\n")
        plot(curves, rows, ns.out / "serve_bench.png")
        print(f"wrote {ns.out}/serve_bench.json, serve_bench.md, serve_bench.png")
