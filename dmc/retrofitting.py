"""One builder from any HF Llama-architecture causal LM to a compressed-cache model (same weights): ``dmc_llama``
for a ``DMCConfig``, ``dms_llama`` for a ``DMSConfig``."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .config import DMCConfig, DMCLlamaConfig
from .dms_config import DMSConfig, DMSLlamaConfig
from .dms_modeling import DMSGate, DMSLlamaForCausalLM
from .metrics import LLAMA_TYPES
from .modeling import DMCGate, DMCLlamaForCausalLM


class NotLlamaError(TypeError):
    """The model is not a Llama-architecture causal LM."""


def _check_llama(model) -> None:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if not isinstance(model, PreTrainedModel) or model_type not in LLAMA_TYPES:
        arch = type(model).__name__ + (f" (model_type={model_type!r})" if model_type else "")
        raise NotLlamaError(
            f"dmc.retrofit needs a Llama-architecture causal LM (LlamaForCausalLM, model_type 'llama'); "
            f"got {arch}. Load a Llama checkpoint with AutoModelForCausalLM.from_pretrained."
        )
    if not hasattr(model, "lm_head"):
        raise NotLlamaError(f"dmc.retrofit needs a causal LM with an lm_head; got {type(model).__name__}")


def dmc_config_from(llama_config, dmc: DMCConfig | DMSConfig) -> DMCLlamaConfig | DMSLlamaConfig:
    """The method's config class over the Llama fields of ``llama_config`` (any method's own fields dropped)."""
    fields = llama_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        fields.pop(key, None)
    fields = {k: v for k, v in fields.items() if not k.startswith(("dmc_", "dms_"))}
    dms = isinstance(dmc, DMSConfig)
    config = (DMSLlamaConfig if dms else DMCLlamaConfig)(**fields, **dmc.to_prefixed())
    config.architectures = ["DMSLlamaForCausalLM" if dms else "DMCLlamaForCausalLM"]
    config._attn_implementation = getattr(llama_config, "_attn_implementation", None) or "sdpa"
    return config


def retrofit(model, dmc: DMCConfig | DMSConfig | None = None) -> DMCLlamaForCausalLM | DMSLlamaForCausalLM:
    """Return a ``DMCLlamaForCausalLM`` (a ``DMCConfig``, the default) or a ``DMSLlamaForCausalLM`` (a
    ``DMSConfig``: fresh gates that evict nothing) holding ``model``'s weights (MHA or GQA, tied or untied
    embeddings).

    The weights are moved, not copied: ``model`` must not be used afterwards. With ``enabled=False`` the result
    computes exactly the original model, and so does ``DMCConfig(gate="adapter")`` at initialisation (its gates merge
    nothing and q and k keep every channel). With ``DMSConfig(gate="channel")`` decisions come from a query channel
    the model still uses: ``set_stage1_multiplier(1.0)`` computes the original model, and after
    ``zero_decision_rows()`` nothing is evicted (the recipe's stage 1 and handover).
    """
    _check_llama(model)
    dmc = dmc or DMCConfig()
    config = dmc_config_from(model.config, dmc)
    param = next(model.parameters())
    dms = isinstance(dmc, DMSConfig)
    new, missing, unexpected = assemble(config, model.state_dict(), device=param.device,
                                        model_cls=DMSLlamaForCausalLM if dms else DMCLlamaForCausalLM)
    if dms and config.dms_gate == "adapter":  # the gates are new: built for real, evicting nothing
        missing = [k for k in missing if ".dms_gate." not in k]
        for layer in new.model.layers:
            with torch.device(param.device):
                layer.dms_gate = DMSGate(config)
            layer.dms_gate.reset()
    if not dms and config.dmc_gate == "adapter":  # likewise, merging nothing
        missing = [k for k in missing if ".dmc_gate." not in k]
        for layer in new.model.layers:
            with torch.device(param.device):
                layer.self_attn.dmc_gate = DMCGate(config)
            torch.nn.init.zeros_(layer.self_attn.dmc_gate.proj.weight)
    if missing or unexpected:
        raise NotLlamaError(f"weights do not fit a Llama layout: missing {missing}, unexpected {unexpected}")
    new.to(param.dtype)
    new.generation_config = model.generation_config
    new.train(model.training)
    return new


def assemble(config, state: dict, *, adapters: bool = False, device="cpu", model_cls=DMCLlamaForCausalLM):
    """Build a ``model_cls`` (a ``DMCLlamaForCausalLM``, or a plain ``LlamaForCausalLM`` for the GQA
    baseline) on the meta device and assign ``state`` into it (no copy).

    Returns (model, missing keys, unexpected keys); a tied ``lm_head`` is not counted as missing.
    """
    with torch.device("meta"):
        new = model_cls(config)
        if adapters:
            new.add_decision_adapters()
    missing, unexpected = new.load_state_dict(state, strict=False, assign=True)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if config.tie_word_embeddings:
        new.lm_head.weight = new.model.embed_tokens.weight
    # Non-persistent buffers (RoPE frequencies) are not in the state dict: rebuild them for real.
    with torch.device(device):
        new.model.rotary_emb = type(new.model.rotary_emb)(config)
    return new, sorted(set(missing) - tied), sorted(unexpected)
