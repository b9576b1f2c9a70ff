"""No eviction: every token is appended and kept. A vanilla Llama under this policy computes exactly its own
outputs, on the paged storage and bytes accounting the DMC cache and the policies use, so that a comparison
(``dmc bench --kv-budget``) isolates what compression does."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .budget import Budget
from .policy import Policy


@dataclass
class KeepAll(Policy):
    budget: Budget = field(default_factory=lambda: Budget(cr=1))
    name: ClassVar[str] = "keep_all"
    observes: ClassVar[bool] = False
    evicts: ClassVar[bool] = False

    def __post_init__(self):
        if self.budget.cr != 1:
            raise ValueError(f"KeepAll keeps every token: its budget is cr=1, not {self.budget}")

    def priority(self, layer):  # never over budget; if asked, the oldest slot goes
        return layer.pair_view(layer.pos_pool, -1).double()
