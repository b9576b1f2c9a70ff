"""The ``dms_llama`` model: Llama whose KV cache evicts tokens after a delay (Dynamic Memory Sparsification).

Per token, layer and KV head a gate on the layer's input decides whether the *previous* token leaves the cache
once ``dms_window`` more tokens have passed (``ops/eviction_attention.py``); deviations from the upstream Llama
classes are marked ``# DMS:``. With ``dms_enabled=False`` every class defers to its Llama parent, so the model
computes exactly the vanilla Llama; with the gates at initialisation (zero) nothing is evicted.

Bundled into exported folders like ``modeling.py`` (dmc/export.py): module-level relative imports only, top-level
names unique across the bundled modules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaRMSNorm,
    apply_rotary_pos_emb,
)

from .dms_cache import DMSCache
from .dms_config import DMSLlamaConfig
from .ops.decode_backends import attend, resolve
from .ops.eviction_attention import eviction_attention, hard_evictions, relaxed_evictions
from .ops.train_attention import MASKED
from .slot_cache import DMCCacheError
from .slot_model import SlotLlamaForCausalLM, SlotLlamaModel, init_weights_keeping_zero


@dataclass
class DMSCausalLMOutput(CausalLMOutputWithPast):
    """Adds the decisions of this forward: ``dms_alpha`` (B,) the fraction of each sequence's real tokens evicted
    by its last token (window counted: only tokens more than ``dms_window`` behind it can be gone), averaged over
    layers and KV heads, hard with a straight-through gradient, for the CR loss; ``dms_evicted`` (L, B, H_kv)
    tokens gone by the last token and ``dms_tokens`` (B,) real tokens, so that the realised CR of a (layer,
    sequence, head) is ``tokens / (tokens - evicted)``. None after a decoding step (one token per sequence into a
    filled cache): the cache holds the counts (``num_slots``)."""

    dms_alpha: torch.Tensor | None = None
    dms_evicted: torch.Tensor | None = None
    dms_tokens: torch.Tensor | None = None


class EvictionRecord(NamedTuple):
    """What one attention layer decided in a forward (``slot_stats[layer_idx]``), per key (B, H_kv, T)."""

    alpha_st: torch.Tensor  # straight-through hard flag of each key
    flagged: torch.Tensor  # bool
    valid: torch.Tensor  # (B, T) real tokens


class DMSGate(nn.Module):
    """The released recipe's decision adapter: its own RMSNorm and a linear map to one logit per KV head, on the
    layer's input (the residual stream before ``input_layernorm``); logit = scale * proj(norm(x)) - offset."""

    def __init__(self, config: DMSLlamaConfig):
        super().__init__()
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.proj = nn.Linear(config.hidden_size, config.num_key_value_heads, bias=False)
        self.proj.slot_zero_init = True  # _init_weights zeroes it, whichever order HF visits the modules in
        self.scale, self.offset = config.dms_gate_scale, config.dms_gate_offset

    def reset(self) -> None:
        """Zero projection, unit norm: logit -offset everywhere, so nothing is evicted."""
        with torch.no_grad():
            self.proj.weight.zero_()
            self.norm.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, hidden) -> logits (B, H_kv, T) in fp32 (a decision is a threshold: no low-precision flips)."""
        return (self.proj(self.norm(x)).float() * self.scale - self.offset).transpose(1, 2)


def read_gate_channel(q: torch.Tensor, groups: int, scale: float, offset: float, keep: float = 0.0):
    """The paper's channel gate. q (B, H, T, D) pre-RoPE -> (logits (B, H_kv, T) in fp32 = scale * q - offset from
    the last channel of each KV group's first query head, q with that channel scaled by ``keep``): 0 once the
    channel decides (attention no longer reads it), fading from 1 to 0 through stage 1. Every other element is
    multiplied by exactly 1, so ``keep=1`` leaves q unchanged."""
    logit = q[:, ::groups, :, -1].float() * scale - offset
    fade = torch.ones(q.shape[1], q.shape[-1], dtype=q.dtype, device=q.device)
    fade[::groups, -1] = keep
    return logit, q * fade[:, None, :]


class DMSLlamaAttention(LlamaAttention):
    """Llama attention over a delayed-eviction cache; with ``config.dms_enabled=False`` exactly ``LlamaAttention``.

    Extra keyword arguments: ``dms_logit`` (B, H_kv, T) the gate's logits (the decoder layer computes them),
    ``slot_valid`` and ``slot_stats`` (``slot_model.py``). ``forward`` runs one of three paths: parallel (training,
    evaluation, the one-pass prefill of an empty cache), decode (one token per sequence into a filled cache) and
    chunk (several tokens into a filled cache: a multi-turn prompt after generation, or chunked prefill).
    """

    def __init__(self, config: DMSLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.logistic_noise = True  # DMS: training draws noise; off only to compare with the eval form
        self.stage1_multiplier: float | None = None  # DMS, channel gate: set during stage 1 (the channel fading)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cfg = self.config
        if not cfg.dms_enabled:
            kwargs.pop("dms_logit", None)
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        B, T, _ = hidden_states.shape
        valid = kwargs.get("slot_valid")
        valid = torch.ones(B, T, dtype=torch.bool, device=hidden_states.device) if valid is None else valid
        shape = (B, T, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        if cfg.dms_gate == "channel":  # DMS: the decision is read from q, whose channel then leaves attention
            keep = 0.0 if self.stage1_multiplier is None else self.stage1_multiplier
            logit, q = read_gate_channel(q, q.shape[1] // k.shape[1], cfg.dms_gate_scale, cfg.dms_gate_offset, keep)
        else:
            logit = kwargs["dms_logit"]
        if self.stage1_multiplier is not None:  # stage 1: the channel fades while nothing is evicted
            logit = torch.full_like(logit, -cfg.dms_gate_offset)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)  # DMS: keys are cached rotated, as Llama's
        layer = past_key_values.layer(self.layer_idx) if past_key_values is not None else None
        if layer is not None and T > 1 and bool((valid[:, 1:].long() < valid[:, :-1].long()).any()):
            raise DMCCacheError("a DMS cache supports left padding only (pad tokens before the prompt)")
        if layer is None or layer.seen_tokens == 0:
            out, record = self._parallel(layer, q, k, v, logit, valid)
        elif T == 1:
            out, record = self._decode(layer, q, k, v, logit, valid)
        else:
            out, record = self._chunk(layer, q, k, v, logit, valid)
        stats = kwargs.get("slot_stats")
        if stats is not None:  # keyed by layer: a gradient-checkpointing recompute overwrites, never doubles
            stats[self.layer_idx] = record
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None

    def _parallel(self, layer, q, k, v, logit, valid):
        """All tokens at once; with an (empty) cache, then store the prompt's tokens that are still held."""
        cfg = self.config
        if self.training and self.stage1_multiplier is None:  # stage 1 evicts nothing: hard decisions, noise or not
            dec = relaxed_evictions(logit, valid, cfg.dms_tau, noise=self.logistic_noise)
        else:
            dec = hard_evictions(logit, valid)
        # a quantised cache: every key and value as its codes give it back, as decoding will read them
        k_seen, v_seen = (layer.round_trip(k), layer.round_trip(v)) if layer is not None else (k, v)
        out = eviction_attention(cfg.dms_train_attention, q, k_seen, v_seen, dec.key_log, dec.flag_log,
                                 cfg.dms_window, self.scaling)
        if layer is not None:
            layer.add(k, v, logit > 0, valid)
        return out, EvictionRecord(dec.alpha_st, dec.flagged, valid)

    def _decode(self, layer, q, k, v, logit, valid):
        """One token per sequence: flag its predecessor, free the slot whose delay is over (the new token takes it),
        then attend over every held slot."""
        decide = logit > 0
        layer.flag_previous(decide, valid)
        layer.add(k, v, decide, valid)
        backend = resolve("dms", self.config.dms_decode_backend, q.device, layer.block_size, layer.kv_bits,
                          layer.dtype if layer.is_initialized else q.dtype)
        out = attend(backend, q[:, :, 0], layer.decode_view(), self.scaling)
        return out[:, :, None], None  # one token evicts nothing by its own end: no record to summarise

    def _chunk(self, layer, q, k, v, logit, valid):
        """Several tokens into a filled cache in one pass: the chunk attends over the held slots (a flagged one while
        within its delay of the query) and over itself with the window rule; then its tokens are stored. On a
        quantised cache every key and value is read as its codes give it back, the chunk's own included."""
        cfg = self.config
        decide = logit > 0
        layer.flag_previous(decide, valid)
        keys, values, kpos, live, flagged = layer.held_view()
        dec = hard_evictions(logit, valid)  # within the chunk; its first token's decision is already in the cache
        qpos = layer.chunk_positions(valid)
        B, H = keys.shape[:2]
        backend = "sdpa" if cfg.dms_train_attention in ("auto", "flex") else cfg.dms_train_attention
        out = eviction_attention(
            backend, q, torch.cat([keys, layer.round_trip(k)], 2), torch.cat([values, layer.round_trip(v)], 2),
            torch.cat([torch.where(live, 0.0, MASKED), dec.key_log], -1),
            torch.cat([torch.where(flagged, MASKED, 0.0), dec.flag_log], -1), cfg.dms_window, self.scaling,
            qpos=qpos, kpos=torch.cat([kpos, qpos[:, None, :].expand(B, H, -1)], -1))
        layer.add(k, v, decide, valid)
        return out, EvictionRecord(dec.alpha_st, dec.flagged, valid)


class DMSLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: DMSLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = DMSLlamaAttention(config, layer_idx)  # DMS: eviction-aware attention
        # DMS: the decision adapter (the channel gate reads q instead: no parameter of its own)
        self.dms_gate = DMSGate(config) if config.dms_gate == "adapter" else None

    def forward(self, hidden_states, *args, **kwargs):
        if self.dms_gate is not None and self.self_attn.config.dms_enabled:  # DMS: the gate reads the layer's input
            kwargs["dms_logit"] = self.dms_gate(hidden_states)
        return super().forward(hidden_states, *args, **kwargs)


def dms_init_weights(module, llama_init) -> None:
    """HF's initialisation, except that a fresh gate evicts nothing (zero projection, unit norm)."""
    if isinstance(module, DMSGate):
        module.reset()
    else:
        init_weights_keeping_zero(module, llama_init)


class DMSLlamaModel(SlotLlamaModel):
    config_class = DMSLlamaConfig
    cache_class = DMSCache
    decoder_layer_class = DMSLlamaDecoderLayer  # DMS: decoder layers with the gate and eviction-aware attention
    switch = "dms_enabled"
    attentions_hint = ("output_attentions is not available on a DMS model; set model.config.dms_enabled = False for "
                       "the vanilla attentions")

    def _init_weights(self, module):
        dms_init_weights(module, super()._init_weights)


class DMSLlamaForCausalLM(SlotLlamaForCausalLM):
    config_class = DMSLlamaConfig
    model_class = DMSLlamaModel  # DMS
    output_class = DMSCausalLMOutput

    def _init_weights(self, module):
        dms_init_weights(module, super()._init_weights)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The decision adapters' parameters: what the released recipe trains (the base stays frozen)."""
        if self.config.dms_gate != "adapter":
            raise ValueError(f"dms_gate={self.config.dms_gate!r} has no parameters of its own (it reads a query "
                             "channel): train every weight (model.trainable: all)")
        return [p for layer in self.model.layers for p in layer.dms_gate.parameters()]

    # ---- the channel gate's stage 1 (as DMC's) -----------------------------------------------------------------
    def set_stage1_multiplier(self, multiplier: float | None) -> None:
        """Channel gate: scale the decision channel in attention by ``multiplier`` and evict nothing; ``None``
        returns to reading decisions from it (and attention no longer reads it)."""
        if multiplier is not None and self.config.dms_gate != "channel":
            raise ValueError("stage 1 fades out a repurposed channel: it is for dms_gate='channel'")
        for layer in self.model.layers:
            layer.self_attn.stage1_multiplier = multiplier

    def decision_rows(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(parameter, rows) that produce the decision channel: of q_proj, the last row of each KV group's first
        query head. Zeroed at the stage-1 handover (``train/handover.py``), so stage 2 starts evicting nothing."""
        if self.config.dms_gate != "channel":
            return []
        c = self.config
        D = c.head_dim if getattr(c, "head_dim", None) else c.hidden_size // c.num_attention_heads
        groups = c.num_attention_heads // c.num_key_value_heads
        rows = torch.arange(c.num_key_value_heads) * groups * D + D - 1
        out = []
        for layer in self.model.layers:
            proj = layer.self_attn.q_proj
            out += [(proj.weight, rows)] + ([(proj.bias, rows)] if proj.bias is not None else [])
        return out

    @torch.no_grad()
    def zero_decision_rows(self) -> None:
        for param, rows in self.decision_rows():
            param[rows] = 0

    def set_logistic_noise(self, enabled: bool) -> None:
        """Training-mode decisions with (default) or without noise; without it and with a small ``dms_tau`` the
        training forward computes the eval forward's hard decisions."""
        for layer in self.model.layers:
            layer.self_attn.logistic_noise = enabled

    def summarise(self, stats: dict) -> dict:
        layers = [stats[i] for i in sorted(stats)]
        if any(r is None for r in layers):  # a decoding step: the cache holds its counts
            return {}
        valid = layers[0].valid  # (B, T), left padding: the last real token is column T - 1
        T, W = valid.shape[1], self.config.dms_window
        gone = (torch.arange(T, device=valid.device) <= T - 1 - W - 1) & valid  # out of the last token's window
        alphas = torch.stack([r.alpha_st for r in layers]) * gone[None, :, None, :]  # (L, B, H_kv, T)
        evicted = torch.stack([(r.flagged & gone[:, None, :]).sum(-1) for r in layers])  # (L, B, H_kv)
        tokens = valid.sum(-1)
        alpha = alphas.sum(dim=(0, 2, 3)) / (tokens.clamp(min=1) * alphas.shape[0] * alphas.shape[2])
        return {"dms_alpha": alpha, "dms_evicted": evicted, "dms_tokens": tokens}


AutoConfig.register("dms_llama", DMSLlamaConfig, exist_ok=True)
AutoModel.register(DMSLlamaConfig, DMSLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(DMSLlamaConfig, DMSLlamaForCausalLM, exist_ok=True)
