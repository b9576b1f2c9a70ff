"""Dynamic Memory Compression for Llama-family models in transformers.

``dmc.retrofit(model, DMCConfig(...))`` turns a Llama causal LM into a ``dmc_llama`` model, and
``dmc.retrofit(model, DMSConfig(...))`` into a ``dms_llama`` model (delayed eviction). ``import dmc`` is
cheap (the ``dmc`` command starts without torch); the first use of any name below imports it, and importing
``dmc.modeling`` and ``dmc.dms_modeling`` (which any of them does) registers both model types with the transformers Auto classes.
"""

import importlib

# name -> the submodule that defines it; loaded on first access (PEP 562), so `dmc --help` stays fast.
# A name must not be a submodule's name too: importing dmc.X binds the module over the attribute.
_EXPORTS = {
    "DMCCache": "cache", "DMCCacheError": "slot_cache", "distillation_kl": "distill",
    "DMCConfig": "config", "DMCConfigError": "config", "DMCLlamaConfig": "config",
    "DMCCausalLMOutput": "modeling", "DMCLlamaForCausalLM": "modeling", "DMCLlamaModel": "modeling",
    "NotLlamaError": "retrofitting", "retrofit": "retrofitting",
    "cr_from_merges": "schedule", "cr_loss": "schedule", "cr_schedule": "schedule", "realised_cr": "schedule",
    "stage1_multiplier": "schedule",
    "DMSCache": "dms_cache", "DMSConfig": "dms_config", "DMSConfigError": "dms_config", "DMSLlamaConfig": "dms_config",
    "DMSCausalLMOutput": "dms_modeling", "DMSLlamaForCausalLM": "dms_modeling", "DMSLlamaModel": "dms_modeling",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dmc' has no attribute {name!r}")
    importlib.import_module(".modeling", __name__)  # every public name needs the registered model types
    importlib.import_module(".dms_modeling", __name__)
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
