"""``dmc bench``: KV-cache bytes, peak memory, prefill time and decode tokens/s of the vanilla model
(HF ``DynamicCache``) and the DMC model, on the same prompts, in one run.

    dmc bench MODEL [--contexts 1024 2048 4096] [--batches 1 8] [--crs 2 4 8] [--out bench/results/NAME]
    dmc bench MODEL --budget-seqs 4 8 16 [--context 2048] [--requests N]   (or --kv-budget GiB ...)

The second form measures tokens/s at a fixed KV-memory budget with continuous batching (eval/throughput.py).

MODEL is a vanilla Llama folder (the DMC variants are then retrofits with a *synthetic* CR imposed on
their decision rows, labelled as such) or a DMC folder (its own learned decisions, plus its vanilla twin
with DMC switched off). Every ratio is against the vanilla run of the same context and batch, measured
in the same process. The ideal decode speed-up for a memory-bound step is (W + KV) / (W + KV / c), with
W the weight bytes and KV the vanilla cache bytes read per step.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

import dmc
from dmc.eval.run import check_kv_bits
from dmc.eval.synthetic import impose_synthetic_cr, impose_synthetic_dms
from dmc.eval.tasks import TaskError
from dmc.generate import ModelFolderError, load
from dmc.hub import ModelSourceError, model_config
from dmc.methods import METHODS, is_compressed, method_of, new_cache
from dmc.metrics import cache_realised_cr, head_dim
from dmc.paged_slots import slot_bytes


@dataclass
class Row:
    model: str  # "vanilla", "dmc", or "dmc synthetic 4x"
    context: int
    batch: int
    realised_cr: float
    kv_bytes: int  # slot blocks handed out (DMC) / key+value tensors (vanilla)
    kv_reserved_bytes: int  # DMC: the whole pool incl. spare blocks + fp32 running state of open slots
    peak_bytes: int  # peak memory above the model's resting footprint during prefill + decode
    prefill_s: float
    decode_tokens_per_s: float
    kv_ratio: float = 1.0  # kv bytes / vanilla kv bytes
    ideal_kv_ratio: float = 1.0  # 1 / realised CR
    decode_speedup: float = 1.0
    ideal_decode_speedup: float = 1.0
    prefill_ratio: float = 1.0  # prefill time / vanilla prefill time


class PeakMemory:
    """Peak memory above the starting point: CUDA allocator statistics, or the process RSS sampled on CPU."""

    def __init__(self, device: torch.device, every_s: float = 0.002):
        self.device, self.every_s = device, every_s

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self.peak = self._rss()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(self.every_s):
                self.peak = max(self.peak, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def bytes(self) -> int:
        return max(0, self.peak - self.base)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def dynamic_cache_bytes(cache: DynamicCache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def measure(model, ids: torch.Tensor, decode_steps: int) -> dict:
    """Prefill ``ids`` (B, T) in one call, then decode ``decode_steps`` greedy tokens one by one."""
    device = ids.device
    compressed = is_compressed(model.config)
    cache = new_cache(model.config) if compressed else DynamicCache(config=model.config)
    gc.collect()
    with PeakMemory(device) as peak:
        _sync(device)
        t0 = time.perf_counter()
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync(device)
        prefill = time.perf_counter() - t0
        nxt = out.logits[:, -1:].argmax(-1)
        del out
        # One untimed step first: the first decode call pays one-off costs (kernel compiles and autotuning,
        # cuBLAS handles for the new shapes) that no later step pays.
        nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(decode_steps):
            nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        _sync(device)
        decode = time.perf_counter() - t0
    seen = torch.full((ids.shape[0],), ids.shape[1] + 1 + decode_steps)
    kv = cache.allocated_bytes() if compressed else dynamic_cache_bytes(cache)
    reserved = cache.reserved_bytes() if compressed else kv
    cr = sum(cache_realised_cr(cache, seen)) / ids.shape[0] if compressed else 1.0
    return {"prefill_s": prefill, "decode_tokens_per_s": ids.shape[0] * decode_steps / decode, "kv_bytes": kv,
            "kv_reserved_bytes": reserved, "peak_bytes": peak.bytes, "realised_cr": cr}


def slot_shrink(model) -> float:
    """Bytes of one slot in the model's cache over one slot in its dtype (1 unless its method's kv_bits < 16)."""
    cfg, D = model.config, head_dim(model.config)
    method = method_of(cfg)
    if method is None:  # a vanilla model keeps HF's cache in its dtype
        return 1.0
    coded = slot_bytes(D, model.dtype, getattr(cfg, method.field("kv_bits"), 16), getattr(cfg, method.field("kv_group"), None))
    return coded / slot_bytes(D, model.dtype)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def prompts(tokenizer, batch: int, context: int) -> torch.Tensor:
    """``batch`` different windows of held-out stdlib code, ``context`` tokens each."""
    from itertools import islice

    from dmc.data import PackedBlocks, SourceSpec, documents

    spec = SourceSpec(kind="stdlib", split="validation")
    blocks = PackedBlocks(lambda: documents(spec), tokenizer, context, cycle=True)
    return torch.stack([b for b, _ in islice(blocks, batch)])


def with_kv_bits(label: str, model, kv_bits: tuple[int, ...]):
    """Yield the DMC or DMS ``model`` once per cache precision (its config's <method>_kv_bits, read by each new
    cache)."""
    field = method_of(model.config).field("kv_bits")
    for bits in kv_bits:
        setattr(model.config, field, bits)
        yield (label if bits == 16 else f"{label} int{bits}"), model


def variants(path: str, crs: list[float], calibration: torch.Tensor, dtype: str, device: str,
             kv_bits: tuple[int, ...] = (16,), method: str = "dmc", dms_window: int = 32):
    """Yield (label, model): the vanilla model first, then the compressed ones (a trained folder itself, or one
    synthetic ``method`` model per CR), each at every ``kv_bits``."""
    model, tok = load(path, dtype, device)
    trained = method_of(model.config)
    if trained is not None:  # a trained folder: its vanilla twin (the method switched off), then itself
        vanilla = copy.deepcopy(model)
        setattr(vanilla.config, trained.switch, False)
        yield "vanilla", vanilla
        del vanilla
        yield from with_kv_bits(trained.name, model, kv_bits)
        return
    yield "vanilla", model
    for cr in crs:
        base = copy.deepcopy(model)
        if method == "dms":
            dmc_model = dmc.retrofit(base, dmc.DMSConfig(target_cr=cr, window=dms_window)).to(device).eval()
            got = impose_synthetic_dms(dmc_model, cr, calibration.to(device))
        else:
            dmc_model = dmc.retrofit(base, dmc.DMCConfig(target_cr=cr)).to(device).eval()
            got = impose_synthetic_cr(dmc_model, cr, calibration.to(device))
        print(f"synthetic {method} {cr:g}x: decisions calibrated, realised {got:.2f}x on the calibration text")
        yield from with_kv_bits(f"{method} synthetic {cr:g}x", dmc_model, kv_bits)
        del dmc_model


def run(path: str, contexts: list[int], batches: list[int], crs: list[float], decode_steps: int, dtype: str,
        device: str, threads: int | None, kv_bits: tuple[int, ...] = (16,), method: str = "dmc",
        dms_window: int = 32) -> list[Row]:
    if threads:
        torch.set_num_threads(threads)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    all_ids = {(c, b): prompts(tok, b, c) for c in contexts for b in batches}
    calibration = prompts(tok, 1, 1024)
    rows: list[Row] = []
    vanilla: dict[tuple[int, int], Row] = {}
    w_bytes = None
    dmc_folder = model_config(path).model_type in METHODS  # vanilla + itself, else vanilla + one per CR
    n_dmc = (1 if dmc_folder else len(crs)) * len(kv_bits)
    bar = tqdm(total=len(all_ids) * (1 + n_dmc), desc="dmc bench", unit="run", file=sys.stderr)
    for label, model in variants(path, crs, calibration, dtype, device, kv_bits, method, dms_window):
        w_bytes = w_bytes or weight_bytes(model)
        measure(model, calibration[:, :64].to(device), 2)  # warm-up: first calls pay for allocations
        for (context, batch), ids in all_ids.items():
            bar.set_postfix_str(f"{label}, context {context}, batch {batch}")
            m = measure(model, ids.to(device), decode_steps)
            bar.update()
            row = Row(model=label, context=context, batch=batch, **m)
            if label == "vanilla":
                vanilla[(context, batch)] = row
            else:
                base = vanilla[(context, batch)]
                kv, c = base.kv_bytes, row.realised_cr / slot_shrink(model)  # codes shrink each slot too
                row.kv_ratio = row.kv_bytes / kv
                row.ideal_kv_ratio = 1 / c
                row.decode_speedup = row.decode_tokens_per_s / base.decode_tokens_per_s
                row.ideal_decode_speedup = (w_bytes + kv) / (w_bytes + kv / c)
                row.prefill_ratio = row.prefill_s / base.prefill_s
            rows.append(row)
            bar.write(format_row(row))
    bar.close()
    return rows


HEADER = (f"{'model':<22}{'ctx':>6}{'B':>3}{'CR':>6}{'KV MiB':>9}{'KV/van':>8}{'ideal':>7}{'peak MiB':>9}"
          f"{'prefill s':>10}{'pre/van':>8}{'dec tok/s':>10}{'speedup':>8}{'ideal':>7}")


def format_row(r: Row) -> str:
    return (f"{r.model:<22}{r.context:>6}{r.batch:>3}{r.realised_cr:>6.2f}{r.kv_bytes / 2**20:>9.1f}"
            f"{r.kv_ratio:>8.3f}{r.ideal_kv_ratio:>7.3f}{r.peak_bytes / 2**20:>9.0f}{r.prefill_s:>10.2f}"
            f"{r.prefill_ratio:>8.2f}{r.decode_tokens_per_s:>10.1f}{r.decode_speedup:>8.2f}{r.ideal_decode_speedup:>7.2f}")


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for batch in sorted({r.batch for r in rows}):
        for label in dict.fromkeys(r.model for r in rows):
            sel = sorted((r for r in rows if r.model == label and r.batch == batch), key=lambda r: r.context)
            name = f"{label} (B={batch})"
            ax1.plot([r.context for r in sel], [r.decode_tokens_per_s for r in sel], marker="o", label=name)
            ax2.plot([r.context for r in sel], [r.kv_bytes / 2**20 for r in sel], marker="o", label=name)
    ax1.set(xlabel="context (tokens)", ylabel="decode tokens/s", title="decode throughput", xscale="log")
    ax2.set(xlabel="context (tokens)", ylabel="KV cache MiB", title="KV-cache memory", xscale="log", yscale="log")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="dmc bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a vanilla Llama or a DMC HF folder")
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--crs", type=float, nargs="+", default=[2, 4, 8], help="synthetic CRs (vanilla MODEL only)")
    ap.add_argument("--method", choices=("dmc", "dms"), default="dmc", help="the synthetic models' method (vanilla "
                    "MODEL only): dmc merges, dms evicts after --dms-window tokens")
    ap.add_argument("--dms-window", type=int, default=32, help="the synthetic DMS models' eviction delay (>= 1)")
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--kv-bits", type=int, nargs="+", default=[16], help="DMC/DMS cache precisions to run: "
                    "16, 8 and/or 4 (slots as integer codes; the vanilla model keeps HF's cache)")
    budget = ap.add_argument_group("throughput at a KV budget (continuous batching)")
    budget.add_argument("--budget-seqs", type=float, nargs="+", default=None,
                        help="budgets that hold this many vanilla sequences of --context tokens")
    budget.add_argument("--kv-budget", type=float, nargs="+", default=None, help="budgets in GiB of slot blocks")
    budget.add_argument("--context", type=int, default=2048, help="longest request: prompt + output tokens")
    budget.add_argument("--out-tokens", type=int, nargs=2, default=[32, 64], metavar=("MIN", "MAX"),
                        help="output lengths of the requests, drawn between MIN and MAX")
    budget.add_argument("--requests", type=int, default=None,
                        help="requests per run (default: enough for the most compressed model to fill the largest budget twice)")
    budget.add_argument("--block-size", type=int, default=16)
    budget.add_argument("--no-hf-baseline", action="store_true", help="skip HF DynamicCache at a static batch")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="folder for the JSON and the plot (default bench/results/<model>)")
    ns = ap.parse_args(argv)
    dtype = ns.dtype or ("bfloat16" if ns.device.startswith("cuda") else "float32")
    fail = lambda msg: sys.exit(f"dmc bench: error: {msg}")  # noqa: E731
    if any(c < 1 for c in ns.crs):
        fail("every --crs value must be >= 1")
    if ns.dms_window < 1:
        fail(f"--dms-window {ns.dms_window}: the eviction delay must be >= 1 token")
    try:
        ns.kv_bits = check_kv_bits(ns.kv_bits)  # dmc eval's check: the same flag, the same message
    except TaskError as err:
        fail(err)
    if ns.device.startswith("cuda") and not torch.cuda.is_available():
        fail(f"--device {ns.device}: this machine has no CUDA device; use --device cpu")
    out = Path(ns.out or Path("bench/results") / Path(ns.model).name)
    try:
        if ns.budget_seqs or ns.kv_budget:
            return _throughput_main(ns, dtype, out, fail)
        synthetic = model_config(ns.model).model_type not in METHODS
        rows = run(ns.model, ns.contexts, ns.batches, ns.crs, ns.decode_steps, dtype, ns.device, ns.threads,
                   ns.kv_bits, ns.method, ns.dms_window)
    except (ModelFolderError, ModelSourceError) as err:
        fail(err)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": ns.model, "device": ns.device, "dtype": dtype, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "decode_steps": ns.decode_steps, "kv_bits": list(ns.kv_bits),
            "synthetic": synthetic}
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    plot(rows, out / "bench.png")
    print(HEADER)
    for r in rows:
        print(format_row(r))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")


def _throughput_main(ns, dtype: str, out: Path, fail) -> None:
    """``--budget-seqs`` / ``--kv-budget``: eval/throughput.py over the vanilla model and the DMC variants."""
    from transformers import AutoTokenizer

    from . import throughput
    from .serving import BudgetError

    config = model_config(ns.model)
    limit = getattr(config, "max_position_embeddings", None)
    if limit and ns.context > limit:
        fail(f"--context {ns.context} is longer than the model's {limit} positions; use --context <= {limit}")
    one = throughput.budget_bytes(config, 1, ns.context, ns.block_size, getattr(torch, dtype))
    budgets = list(ns.budget_seqs or []) + [g * 2**30 / one for g in ns.kv_budget or []]
    synthetic = config.model_type not in METHODS
    most = max(ns.crs) if synthetic else 4.0
    n_requests = ns.requests or math.ceil(2 * max(budgets) * most)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    tok = AutoTokenizer.from_pretrained(ns.model)
    calibration = prompts(tok, 1, 1024)
    try:
        models = variants(ns.model, ns.crs, calibration, dtype, ns.device, ns.kv_bits, ns.method, ns.dms_window)
        n_dmc = (len(ns.crs) if synthetic else 1) * len(ns.kv_bits)
        rows = throughput.run(models, 1 + n_dmc, tok, budgets, ns.context, n_requests,
                              tuple(ns.out_tokens), ns.block_size, not ns.no_hf_baseline)
    except (BudgetError, ValueError) as err:
        fail(err)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"model": ns.model, "device": ns.device, "dtype": dtype, "threads": torch.get_num_threads(),
            "torch": torch.__version__, "context": ns.context, "out_tokens": ns.out_tokens,
            "requests": n_requests, "block_size": ns.block_size, "synthetic": synthetic, "kv_bits": list(ns.kv_bits)}
    (out / "throughput.json").write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    throughput.plot(rows, out / "throughput.png")
    print(throughput.HEADER)
    for r in rows:
        print(throughput.format_row(r))
    print(f"wrote {out / 'throughput.json'} and {out / 'throughput.png'}")
