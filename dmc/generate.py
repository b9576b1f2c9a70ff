"""Load a HF folder (vanilla Llama or DMC) and generate with it; DMC models run on the compressed cache."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .methods import METHODS, is_compressed, method_of, new_cache
from .metrics import LLAMA_TYPES, cache_realised_cr


class ModelFolderError(ValueError):
    """The folder cannot be loaded as a Llama or DMC model; the message says why and what to do."""


def load(path: str | Path, dtype: str = "float32", device: str = "cpu", kv_bits: int | None = None):
    """(model, tokenizer) of a vanilla Llama, ``dmc_llama`` or ``dms_llama`` model (a HF folder or a Hub id), in eval mode.
    ``kv_bits`` (DMC and DMS models): the cache's precision, 16, 8 or 4 (``dmc_kv_bits``/``dms_kv_bits``; None: the
    folder's own)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .hub import ModelSourceError, model_config

    try:
        model_type = model_config(path, "model").model_type
    except ModelSourceError as err:
        raise ModelFolderError(str(err)) from None
    if model_type not in LLAMA_TYPES:
        raise ModelFolderError(f"{path} holds a {model_type!r} model; dmc runs Llama-architecture models "
                               f"({', '.join(LLAMA_TYPES)})")
    if not hasattr(torch, dtype):
        raise ModelFolderError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    if kv_bits is not None:
        check_kv_bits(model_type, kv_bits)
    path = str(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(device).eval()
    except (OSError, SafetensorError) as err:  # a torn or foreign weights file: the folder, not the code, is at fault
        raise ModelFolderError(f"{path}: its weights cannot be read ({str(err).splitlines()[0]}); export or "
                               "download the folder again") from None
    if kv_bits is not None and model_type in METHODS:  # a vanilla Llama keeps HF's cache (16 only: checked above)
        setattr(model.config, METHODS[model_type].field("kv_bits"), kv_bits)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # ragged prompts: the DMC cache skips pad tokens per sequence
    return model, tok


def check_kv_bits(model_type: str, kv_bits: int) -> None:
    """Check a --kv-bits request before loading: valid bits, on a model whose cache can hold codes."""
    from .ops.kv_quant import KV_BITS

    if kv_bits not in KV_BITS:
        raise ModelFolderError(f"--kv-bits {kv_bits}: choose one of {', '.join(map(str, KV_BITS))}")
    if model_type not in METHODS and kv_bits != 16:
        raise ModelFolderError(f"--kv-bits {kv_bits} needs a DMC or DMS folder: a vanilla Llama keeps HF's own cache, "
                               "which this option does not quantise; drop --kv-bits")


@dataclass
class Generation:
    texts: list[str]
    new_tokens: torch.Tensor  # (B, max_new_tokens), pad after EOS
    realised_cr: list[float] | None  # per sequence, over prompt + generated tokens (DMC models only)
    kv_bytes: int | None
    cache: object | None = None  # compressed models: the cache as generation left it
    tokens_seen: torch.Tensor | None = None  # (B,) tokens each sequence put through the cache


def cut_at_stop(text: str, stop: list[str] | None) -> str:
    """``text`` up to the earliest stop string."""
    cuts = [text.find(s) for s in stop or [] if s and s in text]
    return text[: min(cuts)] if cuts else text


@torch.no_grad()
def generate(model, tok, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop: list[str] | None = None, cache=None) -> Generation:
    """Batched generation (ragged prompts left-padded); ``stop`` strings end a sequence and are cut off.
    DMC and DMS models get a fresh cache of their own; ``cache`` passes another compressed cache (with
    ``num_slots``)."""
    batch = tok(prompts, return_tensors="pt", padding=True).to(model.device)
    if cache is None and is_compressed(model.config):
        cache = new_cache(model.config)
    dmc = cache is not None
    torch.manual_seed(seed)
    sample = temperature > 0
    out = model.generate(**batch, past_key_values=cache, max_new_tokens=max_new_tokens, do_sample=sample,
                         temperature=temperature if sample else None, top_p=top_p if sample else None,
                         top_k=None, pad_token_id=tok.pad_token_id,
                         **({"stop_strings": stop, "tokenizer": tok} if stop else {}))
    new = out[:, batch["input_ids"].shape[1]:]
    texts = [cut_at_stop(t, stop) for t in tok.batch_decode(new, skip_special_tokens=True)]
    if not dmc:
        return Generation(texts, new, None, None)
    # The cache has seen every prompt token and every generated position but the last (generate() keeps
    # feeding finished sequences padding, and the mask it extends counts those positions as real).
    seen = batch["attention_mask"].sum(1) + new.shape[1] - 1
    return Generation(texts, new, cache_realised_cr(cache, seen.cpu()), cache.allocated_bytes(), cache, seen)


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="dmc generate", description="generate with a vanilla or DMC HF folder")
    ap.add_argument("model", help="HF folder (e.g. from `dmc export`) or a vanilla Llama folder")
    ap.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--kv-bits", type=int, default=None, help="DMC/DMS cache precision: 16, 8 or 4 "
                    "(slots as integer codes; default: the folder's dmc_kv_bits/dms_kv_bits)")
    ns = ap.parse_args(argv)
    try:
        model, tok = load(ns.model, ns.dtype, ns.device, ns.kv_bits)
    except ModelFolderError as err:
        sys.exit(f"dmc generate: error: {err}")
    result = generate(model, tok, ns.prompt, ns.max_new_tokens, ns.temperature, ns.top_p)
    for i, (prompt, text) in enumerate(zip(ns.prompt, result.texts)):
        cr = f"  [realised CR {result.realised_cr[i]:.2f}]" if result.realised_cr else ""
        print(f"--- prompt {i}{cr}\n{prompt}{text}")
    if result.kv_bytes is not None:
        method = method_of(model.config)
        bits, kv = getattr(model.config, method.field("kv_bits"), 16), result.kv_bytes
        print(f"--- {method.label} cache: {kv / 2**20:.2f} MiB allocated ({kv:,} bytes, {bits}-bit slots)")
