"""The user's recipe in miniature: the same model family and attention layout, strategy, precision (where the
machine has it), stage structure, checkpointing, loggers, data kind and streaming mode; only sizes change.

The tiny model is published into a temporary HF cache under the recipe's own model id, and a streamed
dataset under its dataset id, so the child runs resolve ``meta-llama/...`` and ``HuggingFaceFW/...`` offline
(``HF_HUB_OFFLINE=1``) through the code path a real run takes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from ..recipe import Recipe

# Attention layouts (query heads, KV heads) of the models our recipes name, for when their config is not
# reachable from this machine (no network, gated repo).
# (query heads, KV heads) of the recipes' models, from their published configs, for a machine that cannot reach them
KNOWN_LAYOUTS = {
    "meta-llama/Llama-2-7b-hf": (32, 32), "meta-llama/Llama-2-13b-hf": (40, 40), "meta-llama/Llama-2-70b-hf": (64, 8),
    "meta-llama/Meta-Llama-3-8B": (32, 8), "meta-llama/Llama-3.1-8B": (32, 8), "meta-llama/Llama-3.1-70B": (64, 8),
}
STAGES = (1, 3, 1)  # stage 1 / ramp / hold, in optimiser steps: every boundary is crossed, the kill lands mid-ramp
BLOCK_LEN, VALIDATION_BLOCKS, MAX_ACCUMULATE, DOCUMENTS = 64, 4, 2, 400


def attention_layout(model_path: str) -> tuple[int, int, str | None]:
    """(query heads, KV heads, where they came from: None when the model's config is not reachable here)."""
    from dmc.hub import ModelSourceError, model_config

    try:
        config = model_config(model_path)
        return config.num_attention_heads, config.num_key_value_heads, "its config"
    except ModelSourceError:
        return (*KNOWN_LAYOUTS.get(model_path, (8, 8)), None)


def tiny_config(heads: int, kv_heads: int, vocab: int, tokenizer, max_positions: int):
    """A Llama config of the same family, shrunk: MHA stays MHA (8 heads), GQA keeps its group size on 2 KV heads."""
    from transformers import LlamaConfig

    group = heads // kv_heads
    kv = min(kv_heads, 8) if group == 1 else min(kv_heads, 2)
    head_dim = 16 if kv * group <= 8 else 8
    return LlamaConfig(vocab_size=vocab, hidden_size=kv * group * head_dim, intermediate_size=256,
                       num_hidden_layers=2, num_attention_heads=kv * group, num_key_value_heads=kv,
                       max_position_embeddings=max_positions, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def write_tiny_model(recipe: Recipe, layout: tuple, tokenizer, out: Path) -> tuple[Path, str]:
    from transformers import LlamaForCausalLM

    heads, kv_heads, source = layout
    if source is None:
        known = recipe.model.path in KNOWN_LAYOUTS
        source = f"{'the known Llama layouts' if known else 'a default'}: its config is not reachable here"
    config = tiny_config(heads, kv_heads, len(tokenizer), tokenizer, max_positions=4 * BLOCK_LEN)
    torch.manual_seed(recipe.run.seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    note = (f"model: {recipe.model.path} ({heads}/{kv_heads} heads, from {source}) -> random "
            f"{config.num_hidden_layers}-layer Llama, {config.num_attention_heads}/{config.num_key_value_heads} heads")
    return out, note


def _precision(precision: str, on_gpu: bool) -> str:
    if on_gpu or precision in ("32-true", "32", "bf16-mixed", "bf16-true", "64-true"):
        return precision
    return "32-true"  # fp16 needs CUDA


def scale(recipe: Recipe, out_dir: Path, model_path: str, devices: int, nodes: int, on_gpu: bool,
          accumulate: int | None) -> tuple[Recipe, list[str]]:
    """The miniature recipe (a copy) and the list of what changed."""
    m, d, s, o, r = recipe.model, recipe.data, recipe.schedule, recipe.optim, recipe.run
    acc = accumulate or min(o.accumulate_grad_batches, MAX_ACCUMULATE)
    precision = _precision(r.precision, on_gpu)
    # adapter gates (DMS's, DMC's) have no stage 1 (they start deciding nothing): the same five steps, ramp and hold
    adapter = (m.method == "dms" and m.dms.gate != "channel") or (m.method == "dmc" and m.dmc.gate == "adapter")
    stages = (0, STAGES[0] + STAGES[1], STAGES[2]) if adapter else STAGES
    # attention transfer keeps its share of the steps after stage 1 (at least one step when the recipe has any)
    after = s.ramp_steps + s.finetune_steps
    transfer = max(1, round(s.transfer_steps * (stages[1] + stages[2]) / after)) if s.transfer_steps and after else 0
    changes = [
        f"stages {s.stage1_steps}/{s.ramp_steps}/{s.finetune_steps} -> {'/'.join(map(str, stages))} steps",
        f"block {d.block_len} -> {BLOCK_LEN} tokens, {d.validation_blocks} -> {VALIDATION_BLOCKS} validation blocks",
        f"accumulation {o.accumulate_grad_batches} -> {acc}",
        f"{r.num_nodes} node(s) x {r.devices} device(s) ({r.accelerator}) -> {nodes} x {devices} "
        f"({'gpu' if on_gpu else 'cpu'})",
        f"checkpoint every {r.checkpoint_every} -> 1 step; validation "
        f"{f'every {r.validate_every}' if r.validate_every else 'at the end'} -> every 4 steps and at the end",
    ]
    if transfer:
        changes.append(f"attention transfer {s.transfer_steps} -> {transfer} steps (its share of the steps after stage 1)")
    model = dataclasses.replace(m, path=model_path, dtype="float32" if not on_gpu else m.dtype)
    if m.method == "dms":  # the delay keeps its share of the shorter block (a delay as long as the block evicts nothing)
        window = max(1, m.dms.window * BLOCK_LEN // d.block_len)
        if window != m.dms.window:
            changes.append(f"DMS delay {m.dms.window} -> {window} tokens (its share of the block)")
            model = dataclasses.replace(model, dms=dataclasses.replace(m.dms, window=window))
    if precision != r.precision:
        changes.append(f"precision {r.precision} -> {precision} (no CUDA here)")
    if not on_gpu and m.dtype != "float32":
        changes.append(f"weights {m.dtype} -> float32 (the CPU; precision {precision} still casts)")
    new = Recipe(
        model=model,
        data=dataclasses.replace(d, block_len=BLOCK_LEN, validation_blocks=VALIDATION_BLOCKS,
                                 shuffle_buffer=min(d.shuffle_buffer, 32)),
        schedule=dataclasses.replace(s, stage1_steps=stages[0], ramp_steps=stages[1], finetune_steps=stages[2],
                                     transfer_steps=transfer),
        optim=dataclasses.replace(o, accumulate_grad_batches=acc),
        run=dataclasses.replace(r, out_dir=str(out_dir), accelerator="gpu" if on_gpu else "cpu", devices=devices,
                                num_nodes=nodes, precision=precision, checkpoint_every=1, keep_last=max(r.keep_last, 3),
                                validate_every=4, log_every=1, progress_bar=False, threads=None if on_gpu else 1),
    )
    new.validate()
    return new, changes


def corpus(n: int = DOCUMENTS) -> list[str]:
    """Real text for the published dataset: pieces of the Python standard library."""
    from itertools import islice

    from dmc.data import SourceSpec, documents

    return [text for _, text in islice(documents(SourceSpec(kind="stdlib", piece_chars=2048)), n)]


def publish(recipe: Recipe, tiny: Path, hf_home: Path, hub_model: bool) -> list[str]:
    """Put the tiny model (and a streamed dataset) where the recipe's ids resolve; returns table notes."""
    from ..hub_cache import publish_dataset, publish_model

    notes = []
    if hub_model:
        publish_model(tiny, recipe.model.path, hf_home)
        notes.append(f"published the tiny model as {recipe.model.path} in a temporary HF cache (HF_HUB_OFFLINE=1)")
    d = recipe.data
    if d.kind == "hf":
        texts = corpus()
        splits = {d.train_split: texts}
        if d.validation_split != "holdout":
            splits[d.validation_split] = texts[: DOCUMENTS // 10]
        publish_dataset(splits, d.path, hf_home, d.name)
        notes.append(f"published {len(texts)} stdlib documents as {d.path} ({d.name or 'default'}), streamed")
    return notes
