"""Merge decisions of a whole sequence and the attention biases they imply (training / evaluation forward).

Vocabulary, used the same way across ``dmc/``, shapes (B, H_kv, T):
    logit      merge logit l_t of token t (> 0: token t merges into the slot of token t - 1)
    alpha      the weight ``accumulate`` multiplies the running state by: relaxed alpha~_t in training,
               hard 1[l_t > 0] in evaluation; 0 where token t cannot merge
    alpha_st   hard decision with a straight-through gradient (the CR loss reads it); 0 where t cannot merge
    merged     hard decision (bool); False where t cannot merge
    keep_log   log-weight of state j as a slot of its own: log(1 - alpha~_{j+1}) (0 at the last token,
               MASKED for padding)
    merge_log  log(alpha~_{j+1}): the weight of state j being superseded by j + 1 (MASKED where j + 1 cannot
               merge), so that exp(keep_log) + exp(merge_log) = 1 for a real j with a real successor
A token can merge only if it is real and its sequence had a real token before it (``merge_candidates``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..decisions import gumbel_sigmoid_logits, straight_through_hard
from .train_attention import MASKED


class SequenceDecisions(NamedTuple):
    """The decisions of a whole sequence at once and the biases of the training attention over its states."""

    alpha: torch.Tensor
    alpha_st: torch.Tensor
    merged: torch.Tensor
    keep_log: torch.Tensor
    merge_log: torch.Tensor


def merge_candidates(valid: torch.Tensor) -> torch.Tensor:
    """(B, T) real tokens after their sequence's first real token (left padding only): those that may merge."""
    first = valid.long().argmax(-1)  # (B,) a sequence's first real token always appends
    return (torch.arange(valid.shape[-1], device=valid.device)[None, :] > first[:, None]) & valid


def decode_merge_candidates(valid: torch.Tensor, started: torch.Tensor | None) -> torch.Tensor:
    """(B, T) tokens of a decoded chunk that may merge: real, and their sequence had a real token before them,
    in this chunk or (``started`` (B,), None for an empty cache) in the cache already."""
    earlier = (valid.long().cumsum(-1) - valid.long()) > 0
    return valid & (earlier if started is None else (started[:, None] | earlier))


def _shift_next(x: torch.Tensor, fill: float) -> torch.Tensor:
    """x[..., j] -> x[..., j + 1], with ``fill`` after the last token."""
    return torch.cat([x[..., 1:], torch.full_like(x[..., :1], fill)], dim=-1)


def state_biases(keep_now: torch.Tensor, merge_now: torch.Tensor, can_merge: torch.Tensor, valid: torch.Tensor):
    """(keep_log, merge_log) of each state j from the decision of token j + 1.

    keep_now, merge_now (B, H_kv, T): log(1 - alpha~_t), log(alpha~_t) of token t's own decision;
    can_merge, valid (B, T). A successor that cannot merge closes state j (keep_log 0, merge_log MASKED).
    """
    successor = _shift_next(can_merge.float(), 0.0)[:, None, :] > 0  # token j + 1 may merge into state j
    keep_log = torch.where(successor, _shift_next(keep_now, 0.0), 0.0)
    merge_log = torch.where(successor, _shift_next(merge_now, MASKED), MASKED)
    return torch.where(valid[:, None, :], keep_log, MASKED), merge_log  # padding is never attended


def relaxed_decisions(logit: torch.Tensor, valid: torch.Tensor, tau: float, noise: bool = True) -> SequenceDecisions:
    """Training: Gumbel-sigmoid alpha~ = sigmoid((l + g1 - g2) / tau) (``noise=False``: sigmoid(l / tau))."""
    can = merge_candidates(valid)[:, None, :]
    z = gumbel_sigmoid_logits(logit, tau, noise=noise)  # relaxed logit (B, H_kv, T)
    keep_log, merge_log = state_biases(F.logsigmoid(-z), F.logsigmoid(z), can[:, 0], valid)
    return SequenceDecisions(torch.sigmoid(z) * can, straight_through_hard(z) * can, (z > 0) & can, keep_log, merge_log)


def hard_decisions(logit: torch.Tensor, valid: torch.Tensor) -> SequenceDecisions:
    """Evaluation and prefill: alpha = 1[l > 0]; a merged-over state is hidden (keep_log MASKED)."""
    can = merge_candidates(valid)[:, None, :]
    hard = logit > 0
    keep_now, merge_now = torch.where(hard, MASKED, 0.0), torch.where(hard, 0.0, MASKED)
    keep_log, merge_log = state_biases(keep_now, merge_now, can[:, 0], valid)
    return SequenceDecisions(hard.to(torch.float32) * can, straight_through_hard(logit) * can, hard & can,
                             keep_log, merge_log)


def no_merge_biases(valid: torch.Tensor, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(keep_log, merge_log) of plain causal attention over real tokens: every state is a slot (stage 1)."""
    B, T = valid.shape
    keep_log = torch.where(valid, 0.0, MASKED)[:, None, :].expand(B, num_kv_heads, T)
    return keep_log, torch.full_like(keep_log, MASKED)
