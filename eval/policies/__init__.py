"""Training-free KV-cache compression baselines as cache policies (see base.py)."""

from .base import Budget, Policy, PolicyCache, PolicyLlamaAttention, RowBudgets, apply_policy, policy_attention
from .h2o import H2O
from .keep_all import KeepAll
from .scissorhands import Scissorhands
from .snapkv import SnapKV
from .streaming_llm import StreamingLLM
from .tova import TOVA

POLICIES = {"streaming_llm": StreamingLLM, "tova": TOVA, "h2o": H2O, "scissorhands": Scissorhands, "snapkv": SnapKV}

__all__ = ["Budget", "RowBudgets", "KeepAll", "Policy", "PolicyCache", "PolicyLlamaAttention", "apply_policy", "policy_attention", "POLICIES", "H2O",
           "Scissorhands", "SnapKV", "StreamingLLM", "TOVA"]
