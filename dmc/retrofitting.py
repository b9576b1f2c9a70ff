"""One builder from any HF Llama-architecture causal LM to a ``dmc_llama`` model (same weights)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from .config import DMCConfig, DMCLlamaConfig
from .metrics import LLAMA_TYPES
from .modeling import DMCLlamaForCausalLM


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


def dmc_config_from(llama_config, dmc: DMCConfig) -> DMCLlamaConfig:
    fields = llama_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        fields.pop(key, None)
    fields = {k: v for k, v in fields.items() if not k.startswith("dmc_")}
    config = DMCLlamaConfig(**fields, **dmc.to_prefixed())
    config.architectures = ["DMCLlamaForCausalLM"]
    config._attn_implementation = getattr(llama_config, "_attn_implementation", None) or "sdpa"
    return config


def retrofit(model, dmc: DMCConfig | None = None) -> DMCLlamaForCausalLM:
    """Return a ``DMCLlamaForCausalLM`` holding ``model``'s weights (MHA or GQA, tied or untied embeddings).

    The weights are moved, not copied: ``model`` must not be used afterwards. With ``dmc.enabled=False``
    the result computes exactly the original model.
    """
    _check_llama(model)
    dmc = dmc or DMCConfig()
    config = dmc_config_from(model.config, dmc)
    param = next(model.parameters())
    new, missing, unexpected = assemble(config, model.state_dict(), device=param.device)
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
