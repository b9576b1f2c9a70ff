"""The ``dmc_llama`` model: Llama whose attention merges keys/values per token, layer and KV head.

Deviations from the upstream Llama classes are marked ``# DMC:``. With ``dmc_enabled=False`` every
class defers to its Llama parent, so the model computes exactly the vanilla Llama.

Exported folders carry this module and every module it reaches by relative imports, concatenated into one
file (dmc/export.py): keep relative imports at module level (inside a function they are refused) and
top-level names unique across those modules (a clash is refused); ``config.py`` becomes its own file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.llama.modeling_llama import (
    LlamaAttention,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaModel,
    apply_rotary_pos_emb,
)

from .cache import DMCCache, DMCCacheError
from .config import DMCLlamaConfig
from .decisions import gumbel_sigmoid_logits, read_decision_channel, straight_through_hard
from .ops.accumulate import accumulate
from .ops.decode_attention import decode_attention, resolve_backend
from .ops.train_attention import MASKED, train_attention
from .ops.triton_decode import cache_step_triton


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


def _shift_next(x: torch.Tensor, fill: float) -> torch.Tensor:
    """x[..., j] -> x[..., j + 1], with ``fill`` after the last token."""
    return torch.cat([x[..., 1:], torch.full_like(x[..., :1], fill)], dim=-1)


class DMCLlamaAttention(LlamaAttention):
    def __init__(self, config: DMCLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.stage1_multiplier: float | None = None  # DMC: set during stage 1 (neuron zero-out)
        self.decision_adapter: torch.nn.Parameter | None = None  # DMC: training-only, see add_decision_adapters
        self.gumbel_noise = True  # DMC: training draws Gumbel noise; off only to compare with the eval form

    def _project(self, hidden_states, B, T, D):
        q = self.q_proj(hidden_states).view(B, T, -1, D)
        k = self.k_proj(hidden_states).view(B, T, -1, D)
        if self.decision_adapter is not None:  # DMC: extra (H + H_kv, hidden) rows added to channel c of q and k
            c, H = self.config.dmc_channel_index, q.shape[2]
            extra = hidden_states @ self.decision_adapter.to(hidden_states.dtype).T  # (B, T, H + H_kv)
            bump = torch.zeros(D, dtype=q.dtype, device=q.device)
            bump[c] = 1
            q = q + extra[..., :H, None] * bump
            k = k + extra[..., H:, None] * bump
        return q.transpose(1, 2), k.transpose(1, 2)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        cfg = self.config
        if not cfg.dmc_enabled:
            return super().forward(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        B, T, _ = hidden_states.shape
        D, c = self.head_dim, cfg.dmc_channel_index
        q, k = self._project(hidden_states, B, T, D)  # (B, H, T, D), (B, H_kv, T, D)
        v = self.v_proj(hidden_states).view(B, T, -1, D).transpose(1, 2)
        cos, sin = position_embeddings
        valid = kwargs.get("dmc_valid")
        valid = torch.ones(B, T, dtype=torch.bool, device=q.device) if valid is None else valid

        # DMC: decisions and importances come from channel c of the pre-RoPE k and q.
        logit, omega, q0, k0 = read_decision_channel(
            q, k, c, cfg.dmc_logit_offset, cfg.dmc_weight_offset, cfg.dmc_weight_eps
        )
        if self.stage1_multiplier is not None:  # DMC: stage 1, vanilla attention with channel c fading out
            fade = torch.ones(D, dtype=q.dtype, device=q.device)
            fade[c] = self.stage1_multiplier
            q_rot, k_rot = apply_rotary_pos_emb(q * fade, k * fade, cos, sin)
            keep = torch.where(valid, 0.0, MASKED)[:, None, :].expand(B, k.shape[1], T)
            out = train_attention(cfg.dmc_train_attention, q_rot, k_rot, v, keep, torch.full_like(keep, MASKED), self.scaling)
            self._record(kwargs, torch.zeros_like(logit), logit < logit, valid, omega)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None

        cache = past_key_values
        if cache is not None and cache.layer(self.layer_idx).seen_tokens > 0:
            layer = cache.layer(self.layer_idx)
            # a token can merge only if its sequence had a real token before it
            earlier = (valid.long().cumsum(-1) - valid.long()) > 0
            started = (layer.started[:, None] | earlier) if layer.is_initialized else earlier
            out = self._decode_tokens(cache, q0, k0, v, logit, omega, valid, cos, sin)
            self._record(kwargs, straight_through_hard(logit) * started[:, None], (logit > 0) & started[:, None], valid, omega)
            return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None

        first = valid.long().argmax(-1)  # (B,) first real token: always appends
        after_first = (torch.arange(T, device=q.device)[None, :] > first[:, None]) & valid  # (B, T)
        if self.training:
            z = gumbel_sigmoid_logits(logit, cfg.dmc_tau, noise=self.gumbel_noise)  # relaxed logit (B, H_kv, T)
            alpha = torch.sigmoid(z)
            alpha_loss = straight_through_hard(z)
            hard = z > 0
            keep, merge = F.logsigmoid(-z), F.logsigmoid(z)
        else:
            hard = logit > 0
            alpha = hard.to(torch.float32)
            alpha_loss = straight_through_hard(logit)
            keep = torch.where(hard, MASKED, 0.0)
            merge = torch.where(hard, 0.0, MASKED)
        alpha = alpha * after_first[:, None, :]
        alpha_loss = alpha_loss * after_first[:, None, :]
        next_counts = _shift_next(after_first.float(), 0.0)[:, None, :] > 0  # next token can merge into j
        keep = torch.where(next_counts, _shift_next(keep, 0.0), 0.0)
        merge = torch.where(next_counts, _shift_next(merge, MASKED), MASKED)
        keep = torch.where(valid[:, None, :], keep, MASKED)  # padding is never attended

        # DMC: attend over partially accumulated states; RoPE at the newest token of each state.
        kv = torch.cat([k0, v], dim=-1)
        kv_bar, norm = accumulate(kv, alpha, omega, cfg.dmc_window, out_dtype=torch.promote_types(kv.dtype, torch.float32))
        k_bar, v_bar = kv_bar[..., :D].to(k.dtype), kv_bar[..., D:].to(v.dtype)
        q_rot, k_rot = apply_rotary_pos_emb(q0, k_bar, cos, sin)
        out = train_attention(cfg.dmc_train_attention, q_rot, k_rot, v_bar, keep, merge, self.scaling)
        self._record(kwargs, alpha_loss, hard & after_first[:, None, :], valid, omega)

        if cache is not None:  # DMC: one-pass prefill, then a segment reduction into slots
            if self.training:
                raise DMCCacheError("DMCCache needs hard decisions: call model.eval() before caching")
            if bool((valid[:, 1:].long() - valid[:, :-1].long() < 0).any()):
                raise DMCCacheError("a DMC cache supports left padding only (pad tokens before the prompt)")
            acc = kv_bar[..., -1, :] * norm[..., -1, None]  # running sums of each open slot (B, H_kv, 2D)
            cache.layer(self.layer_idx).prefill(
                k_rot, v_bar, k0, v, omega, acc[..., :D], acc[..., D:], norm[..., -1], alpha, valid
            )
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1)), None

    def _decode_tokens(self, cache: DMCCache, q0, k0, v, logit, omega, valid, cos, sin):
        """Token-by-token: merge/append into the cache, then attend over each head's live slots."""
        layer = cache.layer(self.layer_idx)
        B, H, T, D = q0.shape
        q_rot, _ = apply_rotary_pos_emb(q0, q0[:, :1], cos, sin)
        backend = resolve_backend(self.config.dmc_decode_backend, q0.device, layer.block_size)
        step = cache_step_triton if backend == "triton" else type(layer).step  # the fused update goes with its kernel
        outs = []
        for t in range(T):
            step(layer, k0[:, :, t], v[:, :, t], omega[..., t], logit[..., t] > 0, valid[:, t], cos[:, t], sin[:, t])
            outs.append(decode_attention(backend, q_rot[:, :, t], layer.k_pool, layer.v_pool, layer.block_table,
                                         layer.lens, self.scaling))
        layer.seen_tokens += T
        return torch.stack(outs, dim=2)

    def _record(self, kwargs, alpha, merged, valid, omega) -> None:
        stats = kwargs.get("dmc_stats")
        if stats is not None:  # keyed by layer: a gradient-checkpointing recompute overwrites, never doubles
            w = valid[:, None, :].to(omega.dtype)
            omega_mean = ((omega.detach() * w).sum() / (w.sum() * omega.shape[1]).clamp(min=1))
            stats[self.layer_idx] = (alpha, merged, valid, omega_mean)


class DMCLlamaDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: DMCLlamaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.self_attn = DMCLlamaAttention(config, layer_idx)  # DMC: merge-aware attention


class DMCLlamaModel(LlamaModel):
    config_class = DMCLlamaConfig

    def __init__(self, config: DMCLlamaConfig):
        super().__init__(config)
        self.layers = torch.nn.ModuleList(  # DMC: decoder layers with DMC attention
            [DMCLlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if not self.config.dmc_enabled:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                   use_cache=use_cache, **kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if kwargs.pop("output_attentions", None) or self.config.output_attentions:
            raise ValueError("output_attentions has no per-token meaning on a DMC model (queries attend to merged "
                             "slots, not tokens); set model.config.dmc_enabled = False for the vanilla attentions")
        want_hidden = kwargs.pop("output_hidden_states", None)
        want_hidden = self.config.output_hidden_states if want_hidden is None else want_hidden
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is None and use_cache and not self.training:
            past_key_values = DMCCache(self.config)
        if past_key_values is not None and not isinstance(past_key_values, DMCCache):
            raise DMCCacheError(
                f"a dmc_llama model needs a DMCCache, got {type(past_key_values).__name__}; pass "
                "past_key_values=DMCCache(model.config), or let generate() create it"
            )
        if past_key_values is not None and self.training:
            raise DMCCacheError("DMCCache needs hard decisions: call model.eval() before caching (or use_cache=False)")
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        valid = None
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError("dmc_llama takes a 2D attention_mask (B, past + T) of 0/1 padding flags")
            valid = attention_mask[:, -T:].bool()
        if position_ids is None:
            position_ids = (torch.arange(T, device=inputs_embeds.device) + past)[None]
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden = inputs_embeds
        states = [hidden] if want_hidden else None  # as Llama: the embeddings, each layer's output, the last normed
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings=position_embeddings, position_ids=position_ids,
                           past_key_values=past_key_values, dmc_valid=valid, **kwargs)
            if states is not None:
                states.append(hidden)
        if past_key_values is not None:
            past_key_values.seen_tokens = past + T
        last = self.norm(hidden)
        if states is not None:
            states[-1] = last
        return BaseModelOutputWithPast(last_hidden_state=last, past_key_values=past_key_values,
                                       hidden_states=tuple(states) if states is not None else None)


class DMCLlamaForCausalLM(LlamaForCausalLM):
    config_class = DMCLlamaConfig

    def __init__(self, config: DMCLlamaConfig):
        super().__init__(config)
        self.model = DMCLlamaModel(config)  # DMC
        self.post_init()

    def save_pretrained(self, save_directory, *args, **kwargs):
        """HF's save_pretrained, plus what makes the folder load without our package: the modeling code bundled
        into it and an ``auto_map`` (the folder ``dmc export`` writes, less the run's model card)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        try:  # absolute and in a try: transformers' scan of the bundled copy skips it (no relative import)
            from dmc.export import add_remote_code
        except ImportError:  # the bundled remote code without our package: transformers copies the code files
            return
        add_remote_code(save_directory, self.config)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        if not self.config.dmc_enabled:
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        stats: dict = {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         dmc_stats=stats, **kwargs)
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        return DMCCausalLMOutput(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                 hidden_states=out.hidden_states, **self._summarise(stats))

    @staticmethod
    def _summarise(stats: dict) -> dict:
        if not stats:
            return {}
        layers = sorted(stats)
        alphas = torch.stack([stats[i][0] for i in layers])  # (L, B, H_kv, T)
        valid = stats[layers[0]][2]  # (B, T)
        merges = torch.stack([(stats[i][1] & valid[:, None, :]).sum(-1) for i in layers])  # (L, B, H_kv)
        tokens = valid.sum(-1)  # (B,)
        weight = valid.to(alphas.dtype)[None, :, None, :]
        alpha = (alphas * weight).sum(dim=(0, 2, 3)) / (tokens.clamp(min=1) * alphas.shape[0] * alphas.shape[2])
        omega = torch.stack([stats[i][3] for i in layers])
        return {"dmc_alpha": alpha, "dmc_merges": merges, "dmc_tokens": tokens, "dmc_omega": omega}

    # DMC: generate() gets a DMCCache unless the caller passes a cache.
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (self.config.dmc_enabled and model_kwargs.get("past_key_values") is None
                and generation_config.use_cache is not False):
            model_kwargs["past_key_values"] = DMCCache(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    # ---- stage 1 of the recipe -----------------------------------------------------------------------
    def set_stage1_multiplier(self, multiplier: float | None) -> None:
        """Scale channel c of every q and k head by ``multiplier`` (vanilla attention, no merging);
        ``None`` returns to DMC attention."""
        for layer in self.model.layers:
            layer.self_attn.stage1_multiplier = multiplier

    def set_gumbel_noise(self, enabled: bool) -> None:
        """Training-mode decisions with (default) or without Gumbel noise; without it and with a small
        ``dmc_tau`` the training forward computes the eval forward's hard decisions."""
        for layer in self.model.layers:
            layer.self_attn.gumbel_noise = enabled

    @torch.no_grad()
    def zero_decision_rows(self) -> None:
        """End of stage 1: zero the output rows of q_proj and k_proj that produce channel c (not v_proj)."""
        D, c = self.config.dmc_head_dim, self.config.dmc_channel_index
        for layer in self.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                proj.weight[c::D] = 0
                if proj.bias is not None:
                    proj.bias[c::D] = 0

    def add_decision_adapters(self) -> list[torch.nn.Parameter]:
        """Zero-initialised additive copies of the decision rows (q and k, channel c), one per layer.

        Adam normalises each element's step, so the decision rows can only learn faster than the rest
        of the weight through parameters of their own: give these a larger learning rate (and no weight
        decay). ``fold_decision_adapters`` adds them back into q_proj/k_proj, leaving no extra parameter.
        """
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
