"""What every learned-compression Llama here shares: the model loop over a slot cache and the causal-LM wrapper.

A method (``modeling.py`` DMC, ``dms_modeling.py`` DMS) subclasses ``SlotLlamaModel`` and ``SlotLlamaForCausalLM``
and names its decoder layer, model and cache classes, its kill switch and how its layers' decisions are summarised. Its attention layers
receive ``slot_valid`` (B, T) real-token flags (left padding; None: all real) instead of a 4D mask, and
``slot_stats``, a dict that receives each layer's decisions under its ``layer_idx``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaModel

from .slot_cache import DMCCacheError


def valid_tokens(attention_mask, T: int) -> torch.Tensor | None:
    """(B, T) real-token flags of this forward's tokens from a 2D (B, past + T) mask; None: all real."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError("a compressed-cache Llama takes a 2D attention_mask (B, past + T) of 0/1 padding flags")
    return attention_mask[:, -T:].bool()


def init_weights_keeping_zero(module, llama_init) -> None:
    """HF's initialisation, except that a module marked ``slot_zero_init`` (a fresh gate's projection) is zeroed."""
    if getattr(module, "slot_zero_init", False):
        with torch.no_grad():
            module.weight.zero_()
    else:
        llama_init(module)


class SlotLlamaModel(LlamaModel):
    """A Llama decoder whose layers keep their own slots; with the method disabled it is exactly ``LlamaModel``."""

    cache_class: type = None  # the method's SlotCache
    decoder_layer_class: type = None  # the method's decoder layer, built for every layer in place of Llama's
    switch = ""  # the config field that turns the method on and off ("dmc_enabled", "dms_enabled")
    attentions_hint = ""  # why output_attentions has no meaning, and how to get the vanilla ones

    def __init__(self, config):
        super().__init__(config)
        self.layers = nn.ModuleList([self.decoder_layer_class(config, i) for i in range(config.num_hidden_layers)])
        self.post_init()

    def method_enabled(self) -> bool:
        return bool(getattr(self.config, self.switch))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs) -> BaseModelOutputWithPast:
        if not self.method_enabled():
            kwargs.pop("slot_stats", None)
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                   use_cache=use_cache, **kwargs)
        want_hidden = self._check_outputs(input_ids, inputs_embeds, kwargs)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        B, T = inputs_embeds.shape[:2]
        cache = self._cache_for(past_key_values, use_cache)
        past = cache.get_seq_length() if cache is not None else 0
        valid = valid_tokens(attention_mask, T)  # padding flags reach the layers, not a 4D mask
        if position_ids is None:
            position_ids = (torch.arange(T, device=inputs_embeds.device) + past)[None]
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids=position_ids)
        hidden = inputs_embeds
        states = [hidden] if want_hidden else None  # as Llama: the embeddings, each layer's output, the last normed
        for layer in self.layers:
            hidden = layer(hidden, position_embeddings=position_embeddings, position_ids=position_ids,
                           past_key_values=cache, slot_valid=valid, **kwargs)
            if states is not None:
                states.append(hidden)
        if cache is not None:
            cache.seen_tokens = past + T
        last = self.norm(hidden)
        if states is not None:
            states[-1] = last
        return BaseModelOutputWithPast(last_hidden_state=last, past_key_values=cache,
                                       hidden_states=tuple(states) if states is not None else None)

    def _check_outputs(self, input_ids, inputs_embeds, kwargs: dict) -> bool:
        """Refuse what the method's forward cannot give; pops the output flags and returns whether hidden states
        are wanted."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if kwargs.pop("output_attentions", None) or self.config.output_attentions:
            raise ValueError(self.attentions_hint)
        want_hidden = kwargs.pop("output_hidden_states", None)
        return self.config.output_hidden_states if want_hidden is None else want_hidden

    def _cache_for(self, past_key_values, use_cache):
        """The caller's cache of the method's class, a new one (evaluation with ``use_cache``), or None; anything
        else is refused."""
        cls = self.cache_class
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if past_key_values is None and use_cache and not self.training:
            past_key_values = cls(self.config)
        if past_key_values is not None and not isinstance(past_key_values, cls):
            raise DMCCacheError(
                f"a {self.config.model_type} model needs a {cls.__name__}, got {type(past_key_values).__name__}; "
                f"pass past_key_values={cls.__name__}(model.config), or let generate() create it"
            )
        if past_key_values is not None and self.training:
            raise DMCCacheError(f"{cls.__name__} needs hard decisions: call model.eval() before caching "
                                "(or use_cache=False)")
        return past_key_values


class SlotLlamaForCausalLM(LlamaForCausalLM):
    """The causal-LM head over a ``SlotLlamaModel``: logits, the loss, and the decisions' summary."""

    model_class: type = None  # the method's SlotLlamaModel
    output_class: type = None  # a CausalLMOutputWithPast with the method's summary fields

    def __init__(self, config):
        super().__init__(config)
        self.model = self.model_class(config)
        self.post_init()

    def method_enabled(self) -> bool:
        return self.model.method_enabled()

    def summarise(self, stats: dict) -> dict:
        """The output fields from the layers' decisions (``slot_stats``, keyed by layer)."""
        raise NotImplementedError

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
        if not self.method_enabled():
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=labels,
                                   use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        stats: dict = {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         slot_stats=stats, **kwargs)
        hidden = out.last_hidden_state
        rows = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, rows, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size)
        summary = self.summarise(stats) if stats else {}
        return self.output_class(loss=loss, logits=logits, past_key_values=out.past_key_values,
                                 hidden_states=out.hidden_states, **summary)

    # generate() gets the method's cache unless the caller passes one
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        if (self.method_enabled() and model_kwargs.get("past_key_values") is None
                and generation_config.use_cache is not False):
            model_kwargs["past_key_values"] = self.model.cache_class(self.config)
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
