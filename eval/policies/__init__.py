"""Training-free KV-cache compression baselines as cache policies on the same paged storage, attention code and
bytes accounting as DMC and DMS: a ``Policy`` (policy.py) under a ``Budget`` (budget.py) decides which slot each
pair drops; its ``PolicyCache`` (cache.py) holds ``PolicyLayer``s (paged.py, or dense.py's per-pair buffers for
quality runs); ``apply_policy``/``policy_attention`` (attention.py) swap a vanilla Llama's attention for one that
runs them."""

from .attention import PolicyLlamaAttention, apply_policy, policy_attention
from .budget import Budget, RowBudgets
from .cache import PolicyCache
from .h2o import H2O
from .keep_all import KeepAll
from .policy import Policy
from .scissorhands import Scissorhands
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA

POLICIES = {"streaming_llm": StreamingLLM, "tova": TOVA, "h2o": H2O, "scissorhands": Scissorhands, "snapkv": SnapKV}

__all__ = ["Budget", "RowBudgets", "KeepAll", "Policy", "PolicyCache", "PolicyLlamaAttention", "apply_policy", "policy_attention", "POLICIES", "H2O",
           "Scissorhands", "SnapKV", "StreamingLLM", "TOVA"]
