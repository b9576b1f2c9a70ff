"""Attention transfer (``schedule.transfer_steps``): each layer's DMC attention learns, on its own, to reproduce the
frozen model's attention output from the frozen model's own inputs to that layer, as LoLCATs trains a new attention
before any end-to-end step.

One step: the frozen model (the teacher, or the student's own base with the method switched off) runs the block
without gradients while hooks record every attention layer's input (the normed hidden states and the rotary
embeddings) and output; then every student attention layer runs on its recorded input, and its loss is the
relative mean squared error to the recorded output. No gradient crosses layers (each layer's input is the frozen
model's), so layer l learns as if every layer below it were exact. The CR loss is the end-to-end one, on the mean
decision over every layer, so layers may still share the compression unevenly.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch


class LayerIO(NamedTuple):
    """One attention layer of the frozen model in one forward: its input, rotary embeddings and output."""

    hidden: torch.Tensor  # (B, T, hidden), after input_layernorm
    rope: tuple[torch.Tensor, torch.Tensor]  # (cos, sin)
    output: torch.Tensor  # (B, T, hidden), after o_proj


@contextmanager
def recording(layers):
    """Record every attention module's input and output while the block runs (the hooks go on exit)."""
    records: dict[int, LayerIO] = {}

    def hook_for(i: int):
        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            records[i] = LayerIO(hidden.detach(), tuple(t.detach() for t in kwargs["position_embeddings"]),
                                 output[0].detach())
        return hook

    handles = [layer.self_attn.register_forward_hook(hook_for(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


def relative_mse(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean((output - target)^2) / mean(target^2), in at least fp32: 0 when the layer reproduces the frozen one, 1
    when it outputs zeros. Relative, because attention outputs of different layers differ in scale by orders of
    magnitude and an absolute error would let the largest layers decide every gate."""
    work = torch.promote_types(output.dtype, torch.float32)
    target = target.to(work)
    return (output.to(work) - target).pow(2).mean() / target.pow(2).mean().clamp(min=torch.finfo(work).tiny)


def layer_losses(student, records: dict[int, LayerIO], stats: dict) -> torch.Tensor:
    """(L,) relative MSE of every student attention layer run on the frozen model's recorded input; each layer's
    decisions land in ``stats`` (``slot_stats``), as in a full forward."""
    losses = []
    for i, layer in enumerate(student.model.layers):
        io = records[i]
        out, _ = layer.self_attn(hidden_states=io.hidden, position_embeddings=io.rope, attention_mask=None,
                                 past_key_values=None, slot_valid=None, slot_stats=stats)
        losses.append(relative_mse(out, io.output))
    return torch.stack(losses)


@torch.no_grad()
def frozen_records(frozen, ids: torch.Tensor) -> dict[int, LayerIO]:
    """Every attention layer's input and output in the frozen model's forward of ``ids`` (the decoder alone: the
    records need no logits, and the LM head is a fifth of a 135M model's forward)."""
    with recording(frozen.model.layers) as records:
        frozen.model(input_ids=ids, use_cache=False)
    return records
