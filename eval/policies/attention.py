"""The attention swap: a vanilla Llama's attention modules become ``PolicyLlamaAttention`` (``apply_policy``, or
``with policy_attention(model):``), which run each token through a ``PolicyCache`` when given one and compute exactly
Llama's attention otherwise."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaAttention, apply_rotary_pos_emb

from .cache import PolicyCache
from .paged import left_padded


def _valid_tokens(attention_mask, B: int, T: int, past: int, device) -> torch.Tensor:
    """(B, T) real-token flags from the mask the Llama model hands its layers (None, 4D bool or additive)."""
    if attention_mask is None:
        return torch.ones(B, T, dtype=torch.bool, device=device)
    i = torch.arange(T, device=device)
    diag = attention_mask[:, 0, i, past + i]  # a token sees itself unless it is padding
    return diag if diag.dtype == torch.bool else diag == 0


class PolicyLlamaAttention(LlamaAttention):
    """Llama attention that, given a ``PolicyCache``, runs each token through the policy's cache."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        if not isinstance(past_key_values, PolicyCache):
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        B, T, _ = hidden_states.shape
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        layer = past_key_values.layers[self.layer_idx]
        valid = _valid_tokens(attention_mask, B, T, layer.seen_tokens, q.device)
        if layer.question_aware and layer.seen_tokens == 0:  # the prompt: cached whole, compressed after
            out = layer.prefill_prompt(q, k, v, valid, self.scaling)
            if layer.compress_after_prefill:  # else PolicyCache.branch compresses it, once per budget
                layer.end_prefill()
        elif not (layer.policy.evicts or layer.policy.observes) and layer.seen_tokens == 0 and left_padded(valid):
            out = layer.store_prompt(q, k, v, valid, self.scaling)  # nothing to decide token by token
        else:
            out = layer.stream(q, k, v, valid, self.scaling)
        layer.seen_tokens += T
        out = out.reshape(B, T, -1)
        return self.o_proj(out), None


def apply_policy(model) -> list[nn.Module]:
    """Swap every Llama attention module for ``PolicyLlamaAttention`` (same weights; without a
    ``PolicyCache`` it computes exactly what Llama attention computes) and return the swapped modules.
    For a model the caller owns (``EvalModel`` loads its own); otherwise use ``policy_attention``."""
    swapped = []
    for layer in model.model.layers:
        attn = layer.self_attn
        if type(attn) is LlamaAttention:
            attn.__class__ = PolicyLlamaAttention
            swapped.append(attn)
    return swapped


@contextmanager
def policy_attention(model):
    """``with policy_attention(model):`` the model's attention runs policy caches; on leaving (an error
    included) every module is a plain ``LlamaAttention`` again, as kvpress removes its presses."""
    swapped = apply_policy(model)
    try:
        yield model
    finally:
        for attn in swapped:
            attn.__class__ = LlamaAttention
