"""``Policy``: the base of the training-free policies, which decide which slot of a pair to drop (kvpress's scorer
presses, as dataclasses citing their paper)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from .budget import Budget

if TYPE_CHECKING:
    from .paged import PolicyLayer


@dataclass
class Policy:
    """Decides which slot to drop (kvpress's scorer presses, as dataclasses citing their paper). ``observe``
    sees each step's attention; ``priority`` orders each pair's slots for eviction; ``choose`` names, for every
    pair over budget, the slot (index into that pair's slot list) to evict."""

    budget: Budget
    name: ClassVar[str] = "policy"
    history: ClassVar[int] = 0  # > 0: each slot's attention over the last ``history`` steps (``hist_pool``; -1 unseen)
    observes: ClassVar[bool] = True  # False: never looks at attention (the layer skips computing it)
    evicts: ClassVar[bool] = True  # False: keeps every token (a prompt is then stored in one pass)

    def replay(self, n: int, allowed: list[int]) -> tuple[torch.Tensor, list[int]] | None:
        """For a policy whose choices depend on positions alone: which positions each of a prompt's ``n`` tokens
        attends to ((n, n) bool, itself included) and the slots left after it, in slot order, as the token-by-token
        path would leave them (``allowed[s]``: slots allowed after ``s`` tokens), so the prompt can attend in one
        pass. None: the policy reads attention, so the prompt streams."""
        return None

    @property
    def label(self) -> str:
        b = self.budget
        return f"{self.name}@{b.cr:g}x" if b.cr is not None else f"{self.name}@{b.tokens}tok"

    def observe(self, layer: PolicyLayer, probs: torch.Tensor) -> None:
        """probs: this step's attention per pool slot (group mean), shaped like ``layer.score_pool``."""

    def observe_many(self, layer: PolicyLayer, probs: torch.Tensor) -> None:
        """probs (..., steps, slots): several consecutive steps' attention at once (a prompt's queries)."""
        for i in range(probs.shape[-2]):
            self.observe(layer, probs[..., i, :])

    def priority(self, layer: PolicyLayer) -> torch.Tensor:
        """(B, H_kv, slots) eviction order of each pair's slots: the lowest goes first; +inf protects a slot
        (protected slots go only when nothing else is left, the oldest first)."""
        raise NotImplementedError

    def choose(self, layer: PolicyLayer, over: torch.Tensor) -> torch.Tensor:
        """The slot each pair drops next: the lowest priority, or the oldest slot when all are protected."""
        priority = self.priority(layer)
        protected = torch.isinf(priority).all(-1)
        if not bool(protected.any()):  # the fallback is rare: not computed for every token
            return priority.argmin(-1)
        return torch.where(protected, layer.oldest_slot(), priority.argmin(-1))

    @staticmethod
    def protect_recent(layer: PolicyLayer, priority: torch.Tensor, recent) -> torch.Tensor:
        """``priority`` (B, H_kv, S) with each sequence's ``recent`` (int or (B,)) newest tokens and the dead
        slots set to +inf."""
        pos = layer.pair_view(layer.pos_pool, -1)
        recent = torch.as_tensor(recent, device=pos.device).reshape(-1, 1, 1)
        protected = (pos >= layer.seen[:, None, None] - recent) | (pos < 0)
        return torch.where(protected, float("inf"), priority)
