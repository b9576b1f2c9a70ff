"""The stage-1 -> stage-2 handover: the decision rows (and the decision adapters) become exactly zero, so that
stage 2 starts from l = -5 everywhere (append every token), as the reference's edited stage-1 checkpoint does.

Zero means zero everywhere the optimizer keeps a copy. DeepSpeed ZeRO-1/2/3 hold an fp32 master copy of each
parameter inside the optimizer and copy it back over the module after every step, so an in-place write to the
module alone lasts one step; the master copy goes through ``deepspeed.utils.safe_set_full_fp32_param``.
Adam's moments of these rows are zeroed too (a fresh optimizer for them, as the reference's new run has),
so nothing learnt under the stage-1 fade pushes them. The rest of the optimizer state carries over: the other
weights keep the same LM objective across the boundary. Adam's step counter is per tensor (per group under
DeepSpeed) and is kept, so the rows' first updates are damped by the bias correction (about 0.45 lr at the
first step with betas (0.9, 0.95), reaching lr within some 30 steps).
"""

from __future__ import annotations

import torch

MOMENTS = ("exp_avg", "exp_avg_sq")


def first_adam_step(lr: float, t: int, betas=(0.9, 0.95)) -> float:
    """The largest |update| Adam's first step from zero moments can make at step count t (whatever the gradient):
    lr * m^ / sqrt(v^) with m = (1 - b1) g, v = (1 - b2) g^2 and the bias corrections of step t. One step after
    the handover no decision row is further from zero than this."""
    b1, b2 = betas
    return lr * ((1 - b1) / (1 - b1**t)) / ((1 - b2) / (1 - b2**t)) ** 0.5


def decision_targets(model) -> list[tuple[torch.nn.Parameter, slice | torch.Tensor | None]]:
    """(parameter, rows) to zero, as the model names them (``decision_rows``): DMC's rows ``c::D`` of every q/k
    projection and its decision adapters whole (rows ``None``); DMS's channel gate, its q rows."""
    return model.decision_rows()


def _zero(t: torch.Tensor, rows: slice | torch.Tensor | None) -> None:
    if rows is None:
        t.zero_()
    else:
        t[rows] = 0


def _is_deepspeed(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")  # ZeRO-3 / ZeRO-1, 2 and the bf16 optimizer


@torch.no_grad()
def hand_over(model, optimizer, zero3: bool = False) -> None:
    """Zero the decision rows in the module, the optimizer's master copy and its moments. Every rank calls it
    (the DeepSpeed accessors are collectives)."""
    targets = decision_targets(model)
    _relink_deepspeed_optimizer_state(optimizer)
    for p, rows in targets:
        if _is_deepspeed(p):
            from deepspeed.utils import (
                safe_get_full_fp32_param,
                safe_get_full_optimizer_state,
                safe_set_full_fp32_param,
                safe_set_full_optimizer_state,
            )

            full = safe_get_full_fp32_param(p)
            if full is not None:
                _zero(full, rows)
                safe_set_full_fp32_param(p, full)
            for key in MOMENTS:
                state = safe_get_full_optimizer_state(p, key)
                if state is not None:
                    _zero(state, rows)
                    safe_set_full_optimizer_state(p, state, key)
        else:
            state = optimizer.state.get(p, {})
            for key in MOMENTS:
                if key in state:
                    _zero(state[key], rows)
    # The module's own copy, which the next forward reads (ZeRO-3: gathered, edited on rank 0, re-partitioned).
    with _gathered([p for p, _ in targets], zero3):
        for p, rows in targets:
            _zero(p.data, rows)


def _relink_deepspeed_optimizer_state(optimizer) -> None:
    """DeepSpeed (0.19) ZeRO-1/2 map each parameter to its slice of the optimizer's flat state right after the
    first parameter group's first step, when the other groups have no Adam state yet, and never again: their
    ``safe_get_full_optimizer_state`` then fails. Map them again, now that every group has stepped."""
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state") and hasattr(optimizer, "_hp_optimizer_states_linked"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


class _gathered:
    def __init__(self, params, zero3: bool):
        self.ctx = None
        if zero3:
            import deepspeed

            self.ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=0)

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx else False
