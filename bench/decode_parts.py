"""Where one DMC decode step's time goes, beside vanilla's: the cache update, the paged attention (and its
block-owner lookup), and all attention layers, timed by wrapping those functions (batch 8, greedy).

    .venv/bin/python bench/decode_parts.py --model checkpoints/smollm2-135m --context 1024 --cr 2

The DMC model is timed on each of ``--decode-backends`` (default: the portable paged path and the CPU C++ loop).

Single runs on shared cores vary by 10-20%; read the parts against the total of the same run.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from transformers import AutoTokenizer, DynamicCache

import dmc.modeling as modeling
import dmc.ops.decode_attention as decode_attention
from dmc.cache import DMCCache, DMCLayer
from dmc.eval.bench import prompts, variants


def timed(totals: collections.Counter, name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[name] += time.perf_counter() - t0
        return out

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="checkpoints/smollm2-135m")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--cr", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-backends", nargs="+", default=["paged", "cpu"],
                    help="the DMC model's decode paths, each timed on the same cache contents")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    ids, calibration = prompts(tok, args.batch, args.context), prompts(tok, 2, 512)
    totals: collections.Counter = collections.Counter()
    DMCLayer.step = timed(totals, "cache update", DMCLayer.step)
    modeling.attend = timed(totals, "decode attention", modeling.attend)
    decode_attention._block_owners = timed(totals, "  of which block owners", decode_attention._block_owners)
    for label, model in variants(args.model, [args.cr], calibration, "float32", "cpu"):
        for layer in model.model.layers:
            layer.self_attn.forward = timed(totals, "all attention layers", layer.self_attn.forward)
        for backend in args.decode_backends if "dmc" in label else [None]:
            if backend:
                model.config.dmc_decode_backend = backend
            with torch.no_grad():
                cache = DMCCache(model.config) if "dmc" in label else DynamicCache(config=model.config)
                nxt = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:].argmax(-1)
                for _ in range(2):  # warm-up
                    nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                totals.clear()
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    nxt = model(nxt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
                step = (time.perf_counter() - t0) / args.steps
            parts = ", ".join(f"{k} {v / args.steps * 1000:.1f}" for k, v in totals.items())
            name = f"{label} ({backend})" if backend else label
            print(f"{name}: {step * 1000:.1f} ms per step ({parts} ms)", flush=True)


if __name__ == "__main__":
    main()
