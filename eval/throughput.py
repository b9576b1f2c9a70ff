"""``dmc bench MODEL --budget-seqs 4 8 16``: generated tokens per second at a fixed KV-memory budget.

A budget is named by how many vanilla sequences of ``--context`` tokens it holds (``--kv-budget GiB`` names it
in bytes). For each budget, the same requests (held-out stdlib prompts of mixed lengths, mixed output lengths)
run through the continuous-batching loop of ``serving.py`` for the vanilla model (paged storage, every token
kept) and each DMC model; a compressed cache holds more sequences in the budget, and tokens/s rise. Beside
them, HF's own ``DynamicCache`` at the largest static batch whose full-length cache fits the budget.

The bytes-bound ideal speed-up of a DMC run over vanilla at that budget: (n_d / n_v) * (W + KV_v) / (W + KV_d),
with n the mean sequences in flight, W the weight bytes and KV the mean slot bytes in use per step.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from dmc.methods import METHODS, is_compressed
from dmc.metrics import head_dim
from dmc.paged_slots import slot_bytes

from .bench import prompts, weight_bytes
from .serving import Request, serve


@dataclass
class ThroughputRow:
    model: str
    budget_seqs: float  # vanilla sequences of ``context`` tokens the budget holds
    budget_bytes: int
    requests: int
    realised_cr: float
    mean_in_flight: float
    max_in_flight: int
    tokens_per_s: float  # delivered tokens / wall time (prefills included)
    decode_tokens_per_s: float  # tokens of the decode steps / their time
    mean_kv_bytes: float
    peak_kv_bytes: int
    preempted: int
    in_flight_ratio: float = 1.0  # mean in flight / vanilla's
    speedup: float = 1.0  # tokens/s / vanilla's
    ideal_speedup: float = 1.0
    hf_static_batch: int = 0  # vanilla rows only: HF DynamicCache, largest static batch that fits
    hf_tokens_per_s: float = 0.0


def make_requests(tokenizer, n: int, context: int, out_tokens: tuple[int, int], seed: int = 0) -> list[Request]:
    """``n`` requests from held-out stdlib windows: prompts of context/2 .. context - out_max tokens, outputs
    of out_min .. out_max tokens, drawn with a fixed seed; every request fits ``context`` tokens."""
    lo, hi = out_tokens
    if context - hi < max(2, context // 2):
        raise ValueError(f"--context {context} leaves no room for prompts beside outputs of up to {hi} tokens")
    rng = random.Random(seed)
    return [Request(block[: rng.randint(context // 2, context - hi)], rng.randint(lo, hi))
            for block in prompts(tokenizer, n, context)]


def budget_bytes(config, seqs: float, context: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes that hold ``seqs`` vanilla sequences of ``context`` tokens on the paged storage, each with the
    one spare block per pair that the loop reserves for a step."""
    blocks = math.ceil(context / block_size) + 1
    per_block = block_size * slot_bytes(head_dim(config), dtype)
    return int(seqs * config.num_hidden_layers * config.num_key_value_heads * blocks * per_block)


def as_plain_llama(model) -> LlamaForCausalLM:
    """A DMC folder's vanilla twin as a plain Llama (same weights), so that it runs on the policy cache."""
    fields = {k: v for k, v in model.config.to_dict().items() if not k.startswith(("dmc_", "dms_"))}
    fields.pop("model_type", None)
    fields.pop("auto_map", None)
    plain = LlamaForCausalLM(LlamaConfig(**fields)).to(model.dtype).to(model.device).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    return plain


@torch.no_grad()
def hf_static(model, requests: list[Request], budget: int) -> tuple[int, float]:
    """HF ``DynamicCache`` in static batches: the largest batch whose caches at the longest request's full
    length fit ``budget``; each batch generates its longest output (left padding). (batch, delivered tokens/s)."""
    import time

    config = model.config
    longest = max(r.prompt.numel() + r.max_new_tokens for r in requests)
    per_seq = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim(config) * longest
    per_seq *= torch.empty((), dtype=model.dtype).element_size()
    batch = budget // per_seq
    if batch < 1:
        return 0, 0.0
    t0 = time.perf_counter()
    for i in range(0, len(requests), batch):
        group = requests[i : i + batch]
        T = max(r.prompt.numel() for r in group)
        ids = torch.zeros(len(group), T, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(group):
            ids[j, T - r.prompt.numel():], mask[j, T - r.prompt.numel():] = r.prompt, 1
        new = max(r.max_new_tokens for r in group)
        model.generate(ids.to(model.device), attention_mask=mask.to(model.device), max_new_tokens=new,
                       min_new_tokens=new, do_sample=False, past_key_values=DynamicCache(config=config),
                       pad_token_id=0)
    return int(batch), sum(r.max_new_tokens for r in requests) / (time.perf_counter() - t0)


def run(variants, n_variants: int, tokenizer, budgets: list[float], context: int, n_requests: int,
        out_tokens: tuple[int, int], block_size: int = 16, hf_baseline: bool = True) -> list[ThroughputRow]:
    """``variants``: (label, model) pairs, vanilla first, loaded one at a time (``bench.variants``).
    ``budgets``: in vanilla sequences of ``context`` tokens."""
    requests = make_requests(tokenizer, n_requests, context, out_tokens)
    rows, vanilla = [], {}
    bar = tqdm(total=n_variants * len(budgets), desc="dmc bench (KV budget)", unit="run", file=sys.stderr)
    for label, model in variants:
        if label == "vanilla" and model.config.model_type in METHODS:
            model = as_plain_llama(model)
        w = weight_bytes(model)
        for seqs in budgets:
            budget = budget_bytes(model.config, seqs, context, block_size, model.dtype)
            bar.set_postfix_str(f"{label}, budget {seqs:g} sequences")
            st = serve(model, requests, budget, block_size=block_size).stats
            row = ThroughputRow(label, seqs, budget, len(requests), st.mean_realised_cr, st.mean_in_flight,
                                st.max_in_flight, st.tokens_per_s, st.decode_tokens_per_s, st.mean_kv_bytes,
                                st.peak_bytes, st.preempted)
            if not is_compressed(model.config):
                vanilla[seqs] = row
                if hf_baseline:
                    row.hf_static_batch, row.hf_tokens_per_s = hf_static(model, requests, budget)
            else:
                base = vanilla[seqs]
                row.in_flight_ratio = row.mean_in_flight / base.mean_in_flight
                row.speedup = row.tokens_per_s / base.tokens_per_s
                row.ideal_speedup = row.in_flight_ratio * (w + base.mean_kv_bytes) / (w + row.mean_kv_bytes)
            rows.append(row)
            bar.update()
            bar.write(format_row(row))
    bar.close()
    return rows


HEADER = (f"{'model':<22}{'budget':>7}{'MiB':>8}{'CR':>6}{'in flight':>10}{'max':>5}{'x van':>7}{'tok/s':>8}"
          f"{'dec tok/s':>10}{'speedup':>8}{'ideal':>7}{'preempt':>8}{'HF B':>6}{'HF tok/s':>9}")


def format_row(r: ThroughputRow) -> str:
    return (f"{r.model:<22}{r.budget_seqs:>7g}{r.budget_bytes / 2**20:>8.1f}{r.realised_cr:>6.2f}"
            f"{r.mean_in_flight:>10.2f}{r.max_in_flight:>5}{r.in_flight_ratio:>7.2f}{r.tokens_per_s:>8.1f}"
            f"{r.decode_tokens_per_s:>10.1f}{r.speedup:>8.2f}{r.ideal_speedup:>7.2f}{r.preempted:>8}"
            f"{r.hf_static_batch:>6}{r.hf_tokens_per_s:>9.1f}")


def plot(rows: list[ThroughputRow], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r.model for r in rows):
        sel = sorted((r for r in rows if r.model == label), key=lambda r: r.budget_bytes)
        mib = [r.budget_bytes / 2**20 for r in sel]
        ax1.plot(mib, [r.tokens_per_s for r in sel], marker="o", label=label)
        ax2.plot(mib, [r.mean_in_flight for r in sel], marker="o", label=label)
    hf = sorted((r for r in rows if r.hf_static_batch), key=lambda r: r.budget_bytes)
    if hf:
        ax1.plot([r.budget_bytes / 2**20 for r in hf], [r.hf_tokens_per_s for r in hf], "k--", marker="x",
                 label="vanilla, HF DynamicCache (static batch)")
    ax1.set(xlabel="KV budget (MiB)", ylabel="generated tokens/s", title="throughput at a KV budget", xscale="log")
    ax2.set(xlabel="KV budget (MiB)", ylabel="sequences in flight (mean)", title="batch the budget holds",
            xscale="log", yscale="log")
    ax1.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
