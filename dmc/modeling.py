"""The ``dmc_llama`` model: Llama whose attention merges keys/values per token, layer and KV head.

Deviations from the upstream Llama classes are marked ``# DMC:``. With ``dmc_enabled=False`` every
class defers to its Llama parent, so the model computes exactly the vanilla Llama.

Exported folders carry this module and every module it reaches by relative imports, concatenated into one
file (dmc/export.py): keep relative imports at module level (inside a function they are refused) and
top-level names unique across those modules (a clash is refused); ``config.py`` becomes its own file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaDecoderLayer, apply_rotary_pos_emb

from .cache import DMCCache, DMCCacheError
from .config import DMCLlamaConfig
from .decisions import read_decision_channel, straight_through_hard
from .ops.accumulate import accumulate
from .ops.attention_bias import decode_merge_candidates, hard_decisions, no_merge_biases, relaxed_decisions
from .ops.decode_backends import attend, resolve
from .ops.quant_prefill import prefill_attention_quant
from .ops.train_attention import train_attention
from .slot_model import SlotLlamaForCausalLM, SlotLlamaModel, init_weights_keeping_zero


@dataclass
class DMCCausalLMOutput(CausalLMOutputWithPast):
    """Adds the decisions of this forward: ``dmc_alpha`` (B,) mean hard (straight-through) decision of
    each sequence over layers, KV heads and real tokens, differentiable, for the CR loss;
    ``dmc_merges`` (L, B, H_kv) number of merges and ``dmc_tokens`` (B,) number of real tokens, so that
    the realised CR of a (layer, sequence, head) is ``tokens / (tokens - merges)``."""

    dmc_alpha: torch.Tensor | None = None
    dmc_merges: torch.Tensor | None = None
    dmc_tokens: torch.Tensor | None = None
    dmc_omega: torch.Tensor | None = None  # (L,) mean merge weight of each layer over real tokens (detached)


class LayerDecisions(NamedTuple):
    """What one attention layer decided in a forward (``dmc_stats[layer_idx]``); vocabulary of
    ``ops/attention_bias.py``."""

    alpha_st: torch.Tensor  # (B, H_kv, T) straight-through hard decisions, 0 where a token cannot merge
    merged: torch.Tensor  # (B, H_kv, T) bool
    valid: torch.Tensor  # (B, T) real tokens
    omega_mean: torch.Tensor  # () mean merge weight over real tokens and KV heads (detached)


class DMCGate(nn.Module):
    """The adapter gate (``dmc_gate="adapter"``): a linear map of the attention input to a merge logit and a merge
    weight per KV head, zero at initialisation (logit -logit_offset: nothing merges; omega sigmoid(weight_offset) +
    eps, the channel gate's value at a zero channel). The projection's first H_kv rows give the logits, the rest
    the weights; both in at least fp32 (a decision is a threshold: no low-precision flips), as the channel's."""

    def __init__(self, config: DMCLlamaConfig):
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, 2 * config.num_key_value_heads, bias=False)
        self.proj.slot_zero_init = True  # _init_weights zeroes it, whichever order HF visits the modules in

    def forward(self, x: torch.Tensor, cfg: DMCLlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, hidden) -> (logit, omega), each (B, H_kv, T)."""
        work = torch.promote_types(x.dtype, torch.float32)
        a, b = (self.proj(x).to(work) * cfg.dmc_gate_scale).transpose(1, 2).chunk(2, dim=1)
        return a - cfg.dmc_logit_offset, torch.sigmoid(b + cfg.dmc_weight_offset) + cfg.dmc_weight_eps


class DMCLlamaAttention(LlamaAttention):
    """Llama attention that merges keys/values per token and KV head (DMC); with ``config.dmc_enabled=False``
    it is exactly ``LlamaAttention``.

    Extra keyword arguments (``DMCLlamaModel`` passes them to every layer):
      ``slot_valid`` (B, T) bool, False for left padding (None: every token is real);
      ``slot_stats`` dict, receives this layer's ``LayerDecisions`` under its ``layer_idx``.
    ``forward`` runs one of three paths: stage 1 (``stage1_multiplier`` set: vanilla attention, channel c fading
    out, nothing merges), decode (the cache already holds this layer's tokens: one token at a time into the
    paged cache) or parallel (training, evaluation, and the one-pass prefill of an empty cache).
    """

    def __init__(self, config: DMCLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.stage1_multiplier: float | None = None  # DMC: set during stage 1 (neuron zero-out)
        self.decision_adapter: torch.nn.Parameter | None = None  # DMC: training-only, see add_decision_adapters
        self.gumbel_noise = True  # DMC: training draws Gumbel noise; off only to compare with the eval form
        # DMC: the adapter gate's own parameters (the channel gate reads q and k instead)
        self.dmc_gate = DMCGate(config) if config.dmc_gate == "adapter" else None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cfg = self.config
        if not cfg.dmc_enabled:
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        B, T, _ = hidden_states.shape
        q, k, v = self._project(hidden_states)  # (B, H, T, D), (B, H_kv, T, D) x 2
        valid = kwargs.get("slot_valid")
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if valid is None else valid
        if self.dmc_gate is not None:  # DMC: the adapter decides; q and k keep every channel
            (logit, omega), q0, k0 = self.dmc_gate(hidden_states, cfg), q, k
        else:  # DMC: decisions and importances come from channel c of the pre-RoPE k and q
            logit, omega, q0, k0 = read_decision_channel(
                q, k, cfg.dmc_channel_index, cfg.dmc_logit_offset, cfg.dmc_weight_offset, cfg.dmc_weight_eps
            )
        cache, rope = past_key_values, position_embeddings
        if self.stage1_multiplier is not None:
            out, alpha_st, merged = self._stage1(q, k, v, logit, valid, rope)
        elif cache is not None and cache.layer(self.layer_idx).seen_tokens > 0:
            out, alpha_st, merged = self._decode(cache, q0, k0, v, logit, omega, valid, rope)
        else:
            out, alpha_st, merged = self._parallel(cache, q0, k0, v, logit, omega, valid, rope)
        self._record(kwargs.get("slot_stats"), alpha_st, merged, valid, omega)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None

    def _project(self, hidden_states):
        """q (B, H, T, D), k and v (B, H_kv, T, D), pre-RoPE; decision adapters (training) added to channel c."""
        B, T, _ = hidden_states.shape
        D = self.head_dim
        q = self.q_proj(hidden_states).view(B, T, -1, D)
        k = self.k_proj(hidden_states).view(B, T, -1, D)
        v = self.v_proj(hidden_states).view(B, T, -1, D)
        if self.decision_adapter is not None:  # DMC: extra (H + H_kv, hidden) rows added to channel c of q and k
            c, H = self.config.dmc_channel_index, q.shape[2]
            extra = hidden_states @ self.decision_adapter.to(hidden_states.dtype).T  # (B, T, H + H_kv)
            bump = torch.zeros(D, dtype=q.dtype, device=q.device)
            bump[c] = 1
            q = q + extra[..., :H, None] * bump
            k = k + extra[..., H:, None] * bump
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def _stage1(self, q, k, v, logit, valid, rope):
        """Stage 1: vanilla causal attention with channel c of q and k scaled by ``stage1_multiplier``."""
        fade = torch.ones(self.head_dim, dtype=q.dtype, device=q.device)
        fade[self.config.dmc_channel_index] = self.stage1_multiplier
        q_rot, k_rot = apply_rotary_pos_emb(q * fade, k * fade, *rope)
        keep_log, merge_log = no_merge_biases(valid, k.shape[1])
        out = train_attention(self.config.dmc_train_attention, q_rot, k_rot, v, keep_log, merge_log, self.scaling)
        return out, torch.zeros_like(logit), torch.zeros_like(logit, dtype=torch.bool)

    def _parallel(self, cache, q0, k0, v, logit, omega, valid, rope):
        """All tokens at once: attend over partially accumulated states, RoPE at the newest token of each
        state; with an (empty) cache, store the prompt's slots."""
        cfg, D = self.config, self.head_dim
        if self.training:
            dec = relaxed_decisions(logit, valid, cfg.dmc_tau, noise=self.gumbel_noise)
        else:
            dec = hard_decisions(logit, valid)
        kv = torch.cat([k0, v], dim=-1)
        kv_bar, norm = accumulate(kv, dec.alpha, omega, cfg.dmc_window,
                                  out_dtype=torch.promote_types(kv.dtype, torch.float32))
        k_bar, v_bar = kv_bar[..., :D].to(k0.dtype), kv_bar[..., D:].to(v.dtype)
        q_rot, k_rot = apply_rotary_pos_emb(q0, k_bar, *rope)
        layer = cache.layer(self.layer_idx) if cache is not None else None
        if layer is not None and layer.quantized:  # earlier states as their codes give them back, as decoding sees them
            out = prefill_attention_quant(q_rot, k_rot, v_bar, layer.round_trip(k_rot), layer.round_trip(v_bar),
                                          dec.keep_log, self.scaling)
        else:
            out = train_attention(cfg.dmc_train_attention, q_rot, k_rot, v_bar, dec.keep_log, dec.merge_log,
                                  self.scaling)
        if layer is not None:  # DMC: one-pass prefill, then a segment reduction into slots
            if self.training:
                raise DMCCacheError("DMCCache needs hard decisions: call model.eval() before caching")
            if bool((valid[:, 1:].long() - valid[:, :-1].long() < 0).any()):
                raise DMCCacheError("a DMC cache supports left padding only (pad tokens before the prompt)")
            acc = kv_bar[..., -1, :] * norm[..., -1, None]  # running sums of each open slot (B, H_kv, 2D)
            layer.prefill(
                k_rot, v_bar, k0, v, omega, acc[..., :D], acc[..., D:], norm[..., -1], dec.alpha, valid
            )
        return out, dec.alpha_st, dec.merged

    def _decode(self, cache: DMCCache, q0, k0, v, logit, omega, valid, rope):
        """Token by token: merge/append into the cache, then attend over each head's live slots."""
        layer = cache.layer(self.layer_idx)
        cos, sin = rope
        can = decode_merge_candidates(valid, layer.started if layer.is_initialized else None)[:, None, :]
        q_rot, _ = apply_rotary_pos_emb(q0, q0[:, :1], cos, sin)
        backend = resolve("dmc", self.config.dmc_decode_backend, q0.device, layer.block_size, layer.kv_bits,
                          layer.dtype if layer.is_initialized else q0.dtype)
        # the fused update goes with its attention kernel (the layer knows where it applies)
        fused = backend if backend in ("triton", "cpu") else None
        outs = []
        for t in range(q0.shape[2]):
            layer.step(k0[:, :, t], v[:, :, t], omega[..., t], logit[..., t] > 0, valid[:, t], cos[:, t], sin[:, t],
                       fused=fused)
            outs.append(attend(backend, q_rot[:, :, t], layer.decode_view(), self.scaling))
        layer.seen_tokens += q0.shape[2]
        return torch.stack(outs, dim=2), straight_through_hard(logit) * can, (logit > 0) & can

    def _record(self, stats: dict | None, alpha_st, merged, valid, omega) -> None:
        if stats is not None:  # keyed by layer: a gradient-checkpointing recompute overwrites, never doubles
            w = valid[:, None, :].to(omega.dtype)
            omega_mean = (omega.detach() * w).sum() / (w.sum() * omega.shape[1]).clamp(min=1)
            stats[self.layer_idx] = LayerDecisions(alpha_st, merged, valid, omega_mean)


class DMCLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: DMCLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = DMCLlamaAttention(config, layer_idx)  # DMC: merge-aware attention


class DMCLlamaModel(SlotLlamaModel):
    config_class = DMCLlamaConfig
    cache_class = DMCCache
    decoder_layer_class = DMCLlamaDecoderLayer  # DMC: decoder layers with DMC attention
    switch = "dmc_enabled"
    attentions_hint = ("output_attentions has no per-token meaning on a DMC model (queries attend to merged slots, "
                       "not tokens); set model.config.dmc_enabled = False for the vanilla attentions")

    def _init_weights(self, module):
        init_weights_keeping_zero(module, super()._init_weights)  # DMC: a fresh adapter gate merges nothing


class DMCLlamaForCausalLM(SlotLlamaForCausalLM):
    config_class = DMCLlamaConfig
    model_class = DMCLlamaModel  # DMC
    output_class = DMCCausalLMOutput

    def _init_weights(self, module):
        init_weights_keeping_zero(module, super()._init_weights)

    def gate_parameters(self) -> list[nn.Parameter]:
        """The adapter gates' parameters: all that ``model.trainable: gates`` trains (the base stays frozen)."""
        if self.config.dmc_gate != "adapter":
            raise ValueError("dmc_gate='channel' has no parameters of its own (it reads a channel of q and k): train "
                             "the attention projections or every weight (model.trainable: attention or all)")
        return [p for layer in self.model.layers for p in layer.self_attn.dmc_gate.parameters()]

    def summarise(self, stats: dict) -> dict:
        layers = [stats[i] for i in sorted(stats)]
        alphas = torch.stack([d.alpha_st for d in layers])  # (L, B, H_kv, T)
        valid = layers[0].valid  # (B, T)
        merges = torch.stack([(d.merged & valid[:, None, :]).sum(-1) for d in layers])  # (L, B, H_kv)
        tokens = valid.sum(-1)  # (B,)
        weight = valid.to(alphas.dtype)[None, :, None, :]
        alpha = (alphas * weight).sum(dim=(0, 2, 3)) / (tokens.clamp(min=1) * alphas.shape[0] * alphas.shape[2])
        omega = torch.stack([d.omega_mean for d in layers])
        return {"dmc_alpha": alpha, "dmc_merges": merges, "dmc_tokens": tokens, "dmc_omega": omega}

    # ---- stage 1 of the recipe -----------------------------------------------------------------------
    def set_stage1_multiplier(self, multiplier: float | None) -> None:
        """Scale channel c of every q and k head by ``multiplier`` (vanilla attention, no merging);
        ``None`` returns to DMC attention."""
        if multiplier is not None and self.config.dmc_gate != "channel":
            raise ValueError("stage 1 fades out the repurposed channel: it is for dmc_gate='channel' (the adapter "
                             "gate starts merging nothing)")
        for layer in self.model.layers:
            layer.self_attn.stage1_multiplier = multiplier

    def set_gumbel_noise(self, enabled: bool) -> None:
        """Training-mode decisions with (default) or without Gumbel noise; without it and with a small
        ``dmc_tau`` the training forward computes the eval forward's hard decisions."""
        for layer in self.model.layers:
            layer.self_attn.gumbel_noise = enabled

    @torch.no_grad()
    def zero_decision_rows(self) -> None:
        """End of stage 1: zero the output rows of q_proj and k_proj that produce channel c (not v_proj; the
        decision adapters, rows ``None`` in ``decision_rows``, are left to ``fold_decision_adapters``)."""
        for param, rows in self.decision_rows():
            if rows is not None:
                param[rows] = 0

    def decision_rows(self) -> list[tuple[torch.nn.Parameter, slice | None]]:
        """(parameter, rows) the stage-1 handover zeroes (``train/handover.py``): rows ``c::D`` of every q/k
        projection weight (and bias), and every decision adapter whole (rows ``None``); none for the adapter gate,
        which repurposes no channel."""
        if self.config.dmc_gate != "channel":
            return []
        D, c = self.config.dmc_head_dim, self.config.dmc_channel_index
        rows = slice(c, None, D)
        out = []
        for layer in self.model.layers:
            attn = layer.self_attn
            for proj in (attn.q_proj, attn.k_proj):
                out += [(proj.weight, rows)] + ([(proj.bias, rows)] if proj.bias is not None else [])
            if attn.decision_adapter is not None:
                out.append((attn.decision_adapter, None))
        return out

    def add_decision_adapters(self) -> list[torch.nn.Parameter]:
        """Zero-initialised additive copies of the decision rows (q and k, channel c), one per layer.

        Adam normalises each element's step, so the decision rows can only learn faster than the rest
        of the weight through parameters of their own: give these a larger learning rate (and no weight
        decay). ``fold_decision_adapters`` adds them back into q_proj/k_proj, leaving no extra parameter.
        """
        if self.config.dmc_gate != "channel":
            raise ValueError("decision adapters add to the repurposed channel of dmc_gate='channel'; the adapter gate "
                             "has its own parameters (gate_parameters)")
        params = []
        for layer in self.model.layers:
            attn = layer.self_attn
            if attn.decision_adapter is None:
                w = attn.q_proj.weight
                rows = self.config.num_attention_heads + self.config.num_key_value_heads
                # shape from the config: under ZeRO-3 the weight itself may be a partitioned stub
                attn.decision_adapter = torch.nn.Parameter(w.new_zeros(rows, self.config.hidden_size))
            params.append(attn.decision_adapter)
        return params

    @torch.no_grad()
    def fold_decision_adapters(self) -> None:
        D, c, H = self.config.dmc_head_dim, self.config.dmc_channel_index, self.config.num_attention_heads
        for layer in self.model.layers:
            attn = layer.self_attn
            if attn.decision_adapter is not None:
                attn.q_proj.weight[c::D] += attn.decision_adapter[:H].to(attn.q_proj.weight.dtype)
                attn.k_proj.weight[c::D] += attn.decision_adapter[H:].to(attn.k_proj.weight.dtype)
                attn.decision_adapter = None


AutoConfig.register("dmc_llama", DMCLlamaConfig, exist_ok=True)
AutoModel.register(DMCLlamaConfig, DMCLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(DMCLlamaConfig, DMCLlamaForCausalLM, exist_ok=True)
