"""What compiling a DMC decode step buys on this CPU, per layer: the cache update's arithmetic and the paged
attention, eager against ``torch.compile`` (inductor, static shapes), beside dense SDPA over the same number of
slots and over vanilla's tokens; and the paged attention at other block sizes. SmolLM2-135M's attention shape
(3 KV heads of 9 query heads, head dim 64), batch 8, a merge window of 12, synthetic decisions at the given CR.

    .venv/bin/python bench/decode_compile.py --contexts 1024 4096 --cr 2

Prints one JSON line per context (milliseconds per layer, the best of ``--repeats`` means of ``--steps`` calls).
Single runs on 2 shared cores vary by 10-20%: compare within a line, and run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from dmc.cache import DMCLayer
from dmc.ops.cache_step import open_slot_state, segment_sums, shift_ring
from dmc.ops.decode_attention import decode_attention_paged

B, H_KV, G, D, WINDOW = 8, 3, 3, 64, 12


def per_call_ms(fn, steps: int, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            fn()
        best = min(best, (time.perf_counter() - t0) / steps)
    return round(best * 1000, 3)


def update_arithmetic(ring_k, ring_v, ring_w, seg_len, lens, k_pre, v, w, live, merge, cos, sin):
    """The tensor part of ``DMCLayer.step`` with a merge window (``ops/cache_step.py``): ring, sums, open slot."""
    merge = merge & live
    append = live & ~merge
    ring_k, ring_v, ring_w, seg_len = shift_ring(ring_k, ring_v, ring_w, seg_len, k_pre, v, w, live, merge, append)
    sums = segment_sums(ring_k, ring_v, ring_w, seg_len)
    key, val = open_slot_state(*sums, cos, sin, torch.float32)
    return ring_k, ring_v, ring_w, seg_len, *sums, key, val, lens + append.long()


def prefilled_layer(context: int, cr: float, block_size: int) -> DMCLayer:
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, B, H_KV, context, D, generator=g)
    omega = torch.rand(B, H_KV, context, generator=g) + 0.1
    alpha = (torch.rand(B, H_KV, context, generator=g) < 1 - 1 / cr).float()
    alpha[..., 0] = 0
    layer = DMCLayer(H_KV, D, block_size, WINDOW)
    layer.prefill(k, v, k, v, omega, k[..., -1, :], v[..., -1, :], omega[..., -1], alpha,
                  torch.ones(B, context, dtype=torch.bool))
    return layer


def measure(context: int, cr: float, block_sizes: list[int], steps: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H_KV * G, D, generator=g)
    layer = prefilled_layer(context, cr, 16)
    row = {"context": context, "cr": cr, "slots_per_pair": round(float(layer.lens.float().mean()), 1)}
    args = (layer.ring_k, layer.ring_v, layer.ring_w, layer.seg_len, layer.lens, torch.randn(B, H_KV, D, generator=g),
            torch.randn(B, H_KV, D, generator=g), torch.rand(B, H_KV, generator=g) + 0.1,
            torch.ones(B, H_KV, dtype=torch.bool), torch.rand(B, H_KV, generator=g) < 0.5,
            torch.randn(B, D, generator=g), torch.randn(B, D, generator=g))
    compiled_update = torch.compile(update_arithmetic, dynamic=False)
    row["update_eager_ms"] = per_call_ms(lambda: update_arithmetic(*args), steps, repeats)
    row["update_compiled_ms"] = per_call_ms(lambda: compiled_update(*args), steps, repeats)
    for bs in block_sizes:
        view = (layer if bs == 16 else prefilled_layer(context, cr, bs)).decode_view()
        attend = (q, view.k, view.v, view.block_table, view.lens, None)
        row[f"paged_bs{bs}_eager_ms"] = per_call_ms(
            lambda a=attend, o=view.owned: decode_attention_paged(*a, owned=o), steps, repeats)
        if bs == 16:
            compiled = torch.compile(decode_attention_paged, dynamic=False)
            row["paged_bs16_compiled_ms"] = per_call_ms(lambda a=attend, o=view.owned, c=compiled: c(*a, owned=o),
                                                        steps, repeats)
    qg = q.view(B, H_KV, G, D)
    for name, n in (("dense_same_slots_ms", int(row["slots_per_pair"])), ("dense_vanilla_ms", context)):
        k, v = torch.randn(2, B, H_KV, n, D, generator=g)
        row[name] = per_call_ms(lambda k=k, v=v: F.scaled_dot_product_attention(qg, k, v), steps, repeats)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--cr", type=float, default=2.0)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for context in args.contexts:
        print(json.dumps(measure(context, args.cr, args.block_sizes, args.steps, args.repeats)), flush=True)


if __name__ == "__main__":
    main()
