"""``PolicyCache``: a transformers ``Cache`` whose layers keep at most a policy's budget of slots per (sequence,
KV head).

Two settings. Query-agnostic (the default, and DMC's by construction): the budget holds at every token, so
eviction happens while the prompt streams in and cannot know the question at its end. Question-aware
(``PolicyCache(..., question_aware=True)``, SnapKV's protocol): the prompt is cached whole, the policy scores it
with every prompt query (its observation window holds the question), and it is compressed once, after
prefill, to the budget of the prompt; generated tokens are then appended on top of that budget.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dmc.metrics import head_dim
from dmc.slot_cache import SlotCache

from .budget import RowBudgets
from .dense import DensePolicyLayer
from .paged import PolicyLayer
from .policy import Policy


class PolicyCache(SlotCache):
    """A ``Cache`` whose layers keep at most the policy's budget of slots per (sequence, KV head).

    ``layout``: "paged" (the reference: DMC's paged pool and its bytes) or "dense" (``dense.py``: the same
    slots and decisions in per-pair buffers, several times less bookkeeping per token; for quality runs)."""

    def __init__(self, config, policy: Policy, block_size: int = 16, question_aware: bool = False,
                 layout: str = "paged", kv_bits: int = 16, kv_group: int | None = None):
        layers = {"paged": PolicyLayer, "dense": DensePolicyLayer}
        if layout not in layers:
            raise ValueError(f"unknown cache layout {layout!r}; choose paged or dense")
        H_kv = config.num_key_value_heads
        D = head_dim(config)
        super().__init__(layers=[layers[layout](H_kv, D, block_size, policy, question_aware, kv_bits, kv_group)
                                 for _ in range(config.num_hidden_layers)])
        self.policy, self.question_aware = policy, question_aware

    def defer_compression(self) -> None:
        """Question-aware: the prompt's prefill leaves it whole, for ``branch`` to compress once per budget."""
        if not self.question_aware or any(layer.seen_tokens for layer in self.layers):
            raise ValueError("defer_compression is for a question-aware cache before its prompt")
        for layer in self.layers:
            layer.compress_after_prefill = False

    def branch(self, rows: list[int], crs: list[float]) -> None:
        """After a deferred prefill: row i of the cache becomes the prompt ``rows[i]`` compressed to the budget of
        ``crs[i]`` (the same prompt under several CRs, each from one prefill; the prompt's scoring does not depend
        on the budget, so each row equals a prefill of its own)."""
        policy = replace(self.policy, budget=RowBudgets(tuple(crs)))
        index = torch.tensor(rows, dtype=torch.long)
        if not all(hasattr(layer, "branch") for layer in self.layers):
            raise ValueError("branch needs the dense layout")
        for layer in self.layers:
            if layer.compress_after_prefill or not layer.seen_tokens:
                raise ValueError("branch follows a prefill with defer_compression()")
            layer.branch(index.to(layer.lens.device), policy)
        self.policy = policy
