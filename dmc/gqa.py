"""The GQA up-training baseline: fewer KV heads by mean-pooling, then continued pretraining.

Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints"
(EMNLP 2023), section 2.1: each new key (value) head is the mean of the key (value) projection heads of
its group; the model is then up-trained on a small fraction of the pretraining budget. A model with H_kv
KV heads pooled to G heads stores G/H_kv of the KV cache: its compression ratio is H_kv/G, fixed for
every token, so only divisors of H_kv are reachable (SmolLM2-135M's 3 KV heads: 1.5x is not, 3x is).

Llama repeats KV head j for query heads [j*Q/H_kv, (j+1)*Q/H_kv), so pooling *contiguous* KV heads keeps
every query head attached to the pool of the head it used before.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .export import eval_table, hub_card, write_folder
from .metrics import head_dim

SOURCE_KV_HEADS = "gqa_source_kv_heads"  # config field: the KV heads of the model before pooling


class GQAError(ValueError):
    """The conversion cannot be done as asked; the message says what to change."""


def kv_heads_for(config, *, kv_heads: int | None = None, cr: float | None = None) -> int:
    """The KV-head count to pool ``config``'s model to, given either the count or a compression ratio
    (relative to the model's source, so a converted model asked for the same CR needs no further pooling)."""
    source = getattr(config, SOURCE_KV_HEADS, None) or config.num_key_value_heads
    if kv_heads is None:
        if cr is None:
            raise GQAError("give the number of KV heads to pool to, or a compression ratio")
        kv_heads = round(source / cr)
        if kv_heads < 1 or abs(source / kv_heads - cr) > 1e-6:
            choices = ", ".join(f"{source // g:g}x" for g in range(source, 0, -1) if source % g == 0)
            raise GQAError(f"a {cr:g}x GQA model needs {source}/{cr:g} KV heads, not a whole number; this model "
                           f"has {source} KV heads, so GQA reaches only {choices} (or set the KV heads directly)")
    heads = config.num_key_value_heads  # divides the source's, so dividing it divides both
    if kv_heads < 1 or heads % kv_heads:
        raise GQAError(f"cannot pool the model's {heads} KV heads into {kv_heads}: the new count must divide {heads}")
    return kv_heads


def kv_compression(config) -> float:
    """KV-cache compression of a pooled model relative to its source (1.0 for any other model)."""
    source = getattr(config, SOURCE_KV_HEADS, None)
    return source / config.num_key_value_heads if source else 1.0


def _pool_linear(linear: nn.Linear, heads: int, new_heads: int, head_dim: int) -> nn.Linear:
    group = heads // new_heads
    weight = linear.weight.detach().view(new_heads, group, head_dim, -1).float().mean(1)
    pooled = nn.Linear(linear.in_features, new_heads * head_dim, bias=linear.bias is not None,
                       device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        pooled.weight.copy_(weight.reshape(new_heads * head_dim, -1))
        if linear.bias is not None:
            pooled.bias.copy_(linear.bias.detach().view(new_heads, group, head_dim).float().mean(1).reshape(-1))
    pooled.weight.requires_grad_(linear.weight.requires_grad)
    return pooled


@torch.no_grad()
def pool_kv_heads(model, kv_heads: int):
    """Mean-pool the key and value heads of a Llama causal LM into ``kv_heads`` heads, in place.

    Query and output projections are untouched. The config records the source head count
    (``gqa_source_kv_heads``) so that evaluation reports the compression against the source model.
    """
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise GQAError(f"GQA pooling converts vanilla Llama models; got model_type {config.model_type!r}")
    heads = config.num_key_value_heads
    kv_heads_for(config, kv_heads=kv_heads)  # refuses counts that do not divide the heads
    dim = head_dim(config)
    for layer in model.model.layers:
        attn = layer.self_attn
        attn.k_proj = _pool_linear(attn.k_proj, heads, kv_heads, dim)
        attn.v_proj = _pool_linear(attn.v_proj, heads, kv_heads, dim)
        attn.num_key_value_groups = config.num_attention_heads // kv_heads
    setattr(config, SOURCE_KV_HEADS, getattr(config, SOURCE_KV_HEADS, None) or heads)
    config.num_key_value_heads = kv_heads
    return model


def save_gqa_folder(model, out: str | Path, tokenizer_source: str | Path | None, *, dtype: str = "bfloat16",
                    overwrite: bool = False, card: dict | None = None) -> Path:
    """Write a pooled Llama model as a plain HF Llama folder (atomically), with a short model card."""
    def finish(tmp: Path) -> None:
        (tmp / "README.md").write_text(model_card(model.config, card or {}))

    return write_folder(model, out, tokenizer_source, dtype=dtype, overwrite=overwrite, finish=finish)


def model_card(config, info: dict) -> str:
    source = getattr(config, SOURCE_KV_HEADS, None) or config.num_key_value_heads
    base = info.get("base_model", "unknown")
    tokens = info.get("tokens_seen")
    lines = [
        f"# GQA {Path(str(base)).name} ({kv_compression(config):g}x)", "",
        f"A Llama whose {source} key/value heads were mean-pooled into {config.num_key_value_heads} "
        "(Ainslie et al., 2023)" + (", then up-trained" if info.get("step") else " (not up-trained)") +
        f": its KV cache is {kv_compression(config):g}x smaller than the source model's. A plain Llama folder.", "",
        "| field | value |", "|---|---|",
        f"| source model | {base} |",
        f"| KV heads | {source} -> {config.num_key_value_heads} |",
        f"| training step | {info.get('step', 0)} |",
        f"| tokens seen | {tokens:,} |" if isinstance(tokens, int) else "| tokens seen | 0 |",
    ]
    return hub_card(lines + eval_table(info), ["gqa", "kv-cache-compression", "llama"], base)


def convert(source: str | Path, out: str | Path, *, kv_heads: int | None = None, cr: float | None = None,
            dtype: str = "float32", overwrite: bool = False) -> Path:
    """``dmc gqa-convert``: a Llama folder -> a Llama folder with mean-pooled KV heads (before up-training)."""
    from transformers import AutoModelForCausalLM

    from .hub import model_config

    source = str(source)
    config = model_config(source, "source")  # a folder or a Hub id (ModelSourceError is a ValueError)
    if config.model_type != "llama":
        raise GQAError(f"{source} holds a {config.model_type!r} model; GQA pooling converts vanilla Llama folders")
    target = kv_heads_for(config, kv_heads=kv_heads, cr=cr)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    pool_kv_heads(model, target)
    return save_gqa_folder(model, out, source, dtype=dtype, overwrite=overwrite, card={"base_model": str(source)})


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="dmc gqa-convert", description=convert.__doc__)
    ap.add_argument("source", help="a HF Llama folder or Hub id")
    ap.add_argument("--out", required=True, help="the folder to write")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--kv-heads", type=int, help="KV heads after pooling (must divide the current count)")
    group.add_argument("--cr", type=float, help="compression ratio: source KV heads / new KV heads")
    ap.add_argument("--dtype", default="float32", help="weight dtype of the written folder")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    ns = ap.parse_args(argv)
    try:
        out = convert(ns.source, ns.out, kv_heads=ns.kv_heads, cr=ns.cr, dtype=ns.dtype, overwrite=ns.overwrite)
    except ValueError as err:  # GQAError, ExportError
        sys.exit(f"dmc gqa-convert: error: {err}")
    print(f"wrote {out}")
