"""The training bar: optimiser steps up to where this run stops, not Lightning's micro-batches of an endless epoch.

Lightning's bars count micro-batches (so under gradient accumulation their rate and ETA are off by the
accumulation factor) and, with ``max_epochs=-1`` over a stream, show ``Epoch 0/-2`` and no total.
"""

from __future__ import annotations

import lightning as L


class StepProgress(L.Callback):
    """One bar on rank 0: optimiser steps done of ``last_step``, starting at the resumed step, with the schedule
    stage, the loss and the realised CR of the last step (and the attention-transfer MSE while transfer runs)."""

    def __init__(self, last_step: int, stage1_steps: int, ramp_steps: int, transfer_steps: int = 0):
        self.last_step, self.stage1, self.ramp = last_step, stage1_steps, ramp_steps
        self.transfer_end = stage1_steps + transfer_steps  # the last transfer step's global_step after its update
        self.bar = None

    def stage(self, step: int) -> int:
        return 1 if step <= self.stage1 else 2 if step <= self.stage1 + self.ramp else 3

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.last_step, initial=trainer.global_step, desc="train", unit="step",
                            dynamic_ncols=True, smoothing=0.1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.bar is None or trainer.fit_loop._should_accumulate():
            return
        step = trainer.global_step
        shown = {"stage": self.stage(step)}
        for name in ("loss", "mse", "cr"):
            # the transfer MSE is logged during attention transfer only: afterwards its last value would linger
            if name in trainer.callback_metrics and (name != "mse" or step <= self.transfer_end):
                shown[name] = f"{float(trainer.callback_metrics[name]):.3g}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(step - self.bar.n)

    def on_train_end(self, trainer, pl_module):
        if self.bar is not None:
            self.bar.close()
            self.bar = None
