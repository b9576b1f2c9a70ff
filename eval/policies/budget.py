"""How many slots a policy may keep: ``Budget(cr=c)`` keeps ceil(seen / c) slots as a sequence grows,
``Budget(tokens=n)`` keeps n; ``RowBudgets`` gives each batch row its own CR."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Budget:
    cr: float | None = None
    tokens: int | None = None

    def __post_init__(self):
        if (self.cr is None) == (self.tokens is None):
            raise ValueError("give a budget as either cr=... (>= 1) or tokens=... (>= 1)")
        if (self.cr is not None and self.cr < 1) or (self.tokens is not None and self.tokens < 1):
            raise ValueError(f"budget out of range: {self}; use cr >= 1 or tokens >= 1")

    def slots(self, seen: torch.Tensor) -> torch.Tensor:
        """Slots allowed per sequence after ``seen`` (B,) real tokens."""
        if self.cr is not None:
            return torch.ceil(seen.double() / self.cr - 1e-9).long().clamp(min=1)
        return seen.clamp(max=self.tokens)


@dataclass(frozen=True)
class RowBudgets:
    """One CR per batch row (B,): row b keeps ceil(seen / crs[b]) slots, as ``Budget(cr=crs[b])`` would. A sweep
    (``run.evaluate_variants``) runs several CRs of one policy in one batch this way."""

    crs: tuple[float, ...]

    def __post_init__(self):
        # the budget is asked for every token of every layer: the tensor is made once
        object.__setattr__(self, "_crs", torch.tensor(self.crs, dtype=torch.float64))

    def slots(self, seen: torch.Tensor) -> torch.Tensor:
        """``seen``: (B,) or (B, steps)."""
        crs = self._crs.to(seen.device).view(-1, *[1] * (seen.dim() - 1))
        return torch.ceil(seen.double() / crs - 1e-9).long().clamp(min=1)
