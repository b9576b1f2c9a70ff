"""Which way to group a key's quantisation: per token (each slot alone, groups of channels; what the cache does)
or per channel (each channel over consecutive closed slots; KIVI's choice for keys). Values stay per token in
both, as in KIVI. Measured as the perplexity of a DMC model on its coded cache, at equal bytes per slot.

    .venv/bin/python bench/kv_grouping.py checkpoints/smollm2-135m-dmc2x-hf --bits 4 --groups 16 32

The per-channel rows swap the keys' codes inside the one-pass prompt attention (``prefill_attention_quant``), so
they run the same path as the cache's own rows. They favour per-channel grouping: a group's range is taken over
all its slots, later ones included, where a cache would have to hold a group's slots uncoded until it fills
(KIVI keeps such a residual in full precision; the extra bytes of that residual are not counted here).
"""

from __future__ import annotations

import argparse
import math
from itertools import islice

import torch

import dmc.modeling as modeling
from dmc.data import PackedBlocks
from dmc.eval.lm import EvalModel
from dmc.eval.tasks.ppl import source_documents
from dmc.ops.kv_quant import round_trip_across_slots
from dmc.ops.quant_prefill import prefill_attention_quant

PER_TOKEN, PER_CHANNEL = "per token", "per channel"


def keys_across_slots(bits: int, group: int):
    """``prefill_attention_quant`` with the keys coded per channel across ``group`` closed slots."""

    def attend(q, k, v, k_coded, v_coded, keep_log, scale=None):
        return prefill_attention_quant(q, k, v, round_trip_across_slots(k, keep_log > -1e4, bits, group), v_coded,
                                       keep_log, scale)

    return attend


def perplexity(model: EvalModel, blocks: list[list[int]]) -> float:
    scores, _ = model.block_nll(blocks)
    return math.exp(sum(nll for nll, _ in scores) / sum(n for _, n in scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an exported DMC folder")
    ap.add_argument("--bits", type=int, default=4, choices=(8, 4))
    ap.add_argument("--groups", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--ppl-blocks", type=int, default=32)
    ap.add_argument("--ppl-block", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = EvalModel(args.model, batch_size=args.batch_size)
    if not base.is_dmc:
        raise SystemExit(f"{args.model} is not a DMC model: export a trained DMC checkpoint first (dmc export)")
    packed = PackedBlocks(source_documents("stdlib"), base.tok, args.ppl_block, cycle=False)
    blocks = [b.tolist() for b, _ in islice(packed, args.ppl_blocks)]
    ref = perplexity(base, blocks)
    print(f"{args.model}: {len(blocks)} x {args.ppl_block} stdlib tokens; 16-bit perplexity {ref:.3f}")
    print(f"| keys grouped | group | int{args.bits} perplexity | vs 16-bit |\n|---|---:|---:|---:|")
    for group in args.groups:
        model = EvalModel(args.model, batch_size=args.batch_size, kv_bits=args.bits, kv_group=group)
        for scheme in (PER_TOKEN, PER_CHANNEL):
            if scheme == PER_CHANNEL:
                modeling.prefill_attention_quant = keys_across_slots(args.bits, group)
            try:
                ppl = perplexity(model, blocks)
            finally:
                modeling.prefill_attention_quant = prefill_attention_quant
            print(f"| {scheme} | {group} | {ppl:.3f} | {100 * (ppl / ref - 1):+.1f}% |", flush=True)


if __name__ == "__main__":
    main()
