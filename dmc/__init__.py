"""Dynamic Memory Compression for Llama-family models in transformers.

``dmc.retrofit(model, DMCConfig(...))`` turns a Llama causal LM into a ``dmc_llama`` model; importing
``dmc`` registers that model type with the transformers Auto classes.
"""

from .cache import DMCCache, DMCCacheError
from .distill import distillation_kl
from .config import DMCConfig, DMCConfigError, DMCLlamaConfig
from .modeling import DMCCausalLMOutput, DMCLlamaForCausalLM, DMCLlamaModel
from .retrofit import NotLlamaError, retrofit
from .schedule import cr_from_merges, cr_loss, cr_schedule, realised_cr, stage1_multiplier

__all__ = [
    "DMCCache", "DMCCacheError", "DMCConfig", "DMCConfigError", "DMCLlamaConfig", "DMCCausalLMOutput",
    "DMCLlamaForCausalLM", "DMCLlamaModel", "NotLlamaError", "retrofit", "cr_loss", "cr_schedule",
    "realised_cr", "stage1_multiplier", "cr_from_merges", "distillation_kl",
]
__version__ = "0.1.0"
