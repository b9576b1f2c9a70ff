"""`dmc train`'s progress bar: the stage, the loss, the realised CR, and the attention-transfer MSE only while
transfer runs (after it, its last value would linger to the end of the run)."""

from types import SimpleNamespace

import pytest

pytest.importorskip("lightning")

from dmc.train.progress import StepProgress  # noqa: E402


class _Bar:
    n = 0

    def set_postfix(self, shown, refresh=False):
        self.shown = shown

    def update(self, k):
        self.n += k


def _shown_at(progress: StepProgress, step: int) -> dict:
    metrics = {"loss": 2.0, "mse": 0.03, "cr": 1.5}  # Lightning keeps a metric's last value in callback_metrics
    trainer = SimpleNamespace(global_step=step, callback_metrics=metrics,
                              fit_loop=SimpleNamespace(_should_accumulate=lambda: False))
    progress.on_train_batch_end(trainer, None, None, None, 0)
    return progress.bar.shown


def test_the_transfer_mse_is_shown_during_transfer_only():
    progress = StepProgress(last_step=20, stage1_steps=0, ramp_steps=12, transfer_steps=5)
    progress.bar = _Bar()
    assert "mse" in _shown_at(progress, 5)  # global_step after the 5th (last) transfer step's update
    after = _shown_at(progress, 6)
    assert "mse" not in after and after["stage"] == 2 and after["loss"] == "2" and after["cr"] == "1.5"
    assert _shown_at(progress, 13)["stage"] == 3
