"""The stage-1 -> stage-2 handover and the Gumbel noise of a real (tiny) training run.

After the handover the decision rows and adapters are zero in the parameters, in DeepSpeed's fp32 master copy
and in Adam's moments, so one stage-2 step later no element of them is further from zero than Adam's first step
from fresh moments can move it: |update| <= lr * r(t) (bias corrections of step t), whatever the gradient.
Old values restored by a master copy, adapters trained during stage 1, or stale moments carrying stage 1's
momentum all exceed that bound."""

import json

import pytest
import torch

pytest.importorskip("lightning")

import dmc  # noqa: E402
import dmc.modeling  # noqa: E402
import dmc.ops.attention_bias  # noqa: E402
from dmc.train.handover import first_adam_step  # noqa: E402
from tests.helpers import SMOLLM2, check_zero_export, logged, run_dmc, tiny_train, write_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")

STAGE1 = 2  # configs/tiny.yaml
LR, DECISION_LR, BETAS = 1.0e-3, 5.0e-2, (0.9, 0.95)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama"))


def _assert_one_fresh_step(values: torch.Tensor, size: float, what: str) -> None:
    worst = float(values.detach().abs().max())
    assert worst <= size * (1 + 1e-4), f"{what}: |value| up to {worst:.3g}, more than one fresh Adam step ({size:.3g})"


def _check_rows_after_one_stage2_step(state: dict, config) -> None:
    D, c = config.dmc_head_dim, config.dmc_channel_index % config.dmc_head_dim
    t = STAGE1 + 1  # Adam's step count at stage 2's first step
    for i in range(config.num_hidden_layers):
        for proj in ("q_proj", "k_proj"):
            rows = state[f"model.layers.{i}.self_attn.{proj}.weight"][c::D]
            _assert_one_fresh_step(rows, first_adam_step(LR, t, BETAS), f"layer {i} {proj} decision rows")
        adapter = state[f"model.layers.{i}.self_attn.decision_adapter"]
        _assert_one_fresh_step(adapter, first_adam_step(DECISION_LR, t, BETAS), f"layer {i} decision adapter")


def _state_and_config(run_dir):
    from dmc.train.export import load_checkpoint, recorded_config

    state, info = load_checkpoint(run_dir)
    return state, recorded_config(info, dmc.DMCLlamaConfig)


def test_handover_zeroes_rows_adapters_and_moments(tiny, tmp_path):
    tiny_train(tiny, tmp_path / "run", "--stop_at", str(STAGE1))
    state, config = _state_and_config(tmp_path / "run")
    adapters = [v for k, v in state.items() if "decision_adapter" in k]
    assert len(adapters) == config.num_hidden_layers and all(not a.any() for a in adapters), \
        "the decision adapters moved during stage 1"
    # resumed from the last stage-1 checkpoint (saved before the handover): the handover still happens
    tiny_train(tiny, tmp_path / "run", "--stop_at", str(STAGE1 + 1))
    _check_rows_after_one_stage2_step(*_state_and_config(tmp_path / "run"))


@pytest.mark.slow
@pytest.mark.parametrize("strategy,distill", [("deepspeed_stage_2", True), ("deepspeed_stage_3", False)])
def test_handover_reaches_deepspeed_master_copy_and_exports_two_processes(tiny, tmp_path, strategy, distill):
    # ZeRO-2 runs with distillation too (ZeRO-3 refuses it): the bound below holds whatever the gradient.
    extra = ["--distill.weight", "0.5"] if distill else []
    done = run_dmc("train", "--config", "configs/tiny.yaml", "--model.path", tiny, "--run.strategy", strategy,
                   "--run.accelerator", "cpu", "--run.devices", "2", "--run.out_dir", str(tmp_path / "run"),
                   "--stop_at", str(STAGE1 + 1), *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    state, config = _state_and_config(tmp_path / "run")
    _check_rows_after_one_stage2_step(state, config)
    if distill:  # the KL of every step, ~0 at step 0 (the retrofit appends everything), and no teacher saved
        kl = logged(tmp_path / "run", "train/kl_loss")
        assert sorted(kl) == list(range(STAGE1 + 1)) and abs(kl[0][0]) < 1e-6
        assert all(1e-4 < v < 100 for (v,) in list(kl.values())[1:])
        assert not any("teacher" in k for k in state)
    # validation runs under DeepSpeed too, each rank scoring its share of the held-out blocks
    validation = json.loads((tmp_path / "run" / "summary.json").read_text())["validation"]
    assert validation["step"] == STAGE1 + 1 and validation["tokens"] == 4 * 31 and validation["perplexity"] > 1
    # and the ZeRO checkpoint exports (this run is test_export's ZeRO case, trained once for both)
    check_zero_export(tmp_path / "run", tiny, STAGE1 + 1, target_cr=2.0, window=12)


def _record_noise(monkeypatch) -> list[torch.Tensor]:
    """The Gumbel noise (g1 - g2) of every training forward, layer 0 only."""
    calls: list[torch.Tensor] = []
    original = dmc.ops.attention_bias.gumbel_sigmoid_logits

    def recording(logit, tau, generator=None, noise=True):
        z = original(logit, tau, generator, noise)
        calls.append((z * tau - logit).detach().clone())
        return z

    monkeypatch.setattr(dmc.ops.attention_bias, "gumbel_sigmoid_logits", recording)
    return calls


def test_noise_differs_across_micro_batches_and_replays_on_resume(tiny, tmp_path, monkeypatch):
    calls = _record_noise(monkeypatch)
    accumulate = ["--optim.accumulate_grad_batches", "2"]
    tiny_train(tiny, tmp_path / "a", *accumulate)
    full = calls[0::2]  # two layers per forward: keep layer 0
    per_step = [full[i:i + 2] for i in range(0, len(full), 2)]
    assert len(per_step) == 8 - STAGE1  # stage 1 has no decisions to relax
    for micro0, micro1 in per_step:
        assert not torch.equal(micro0, micro1), "the micro-batches of one step drew the same noise"
    calls.clear()
    tiny_train(tiny, tmp_path / "b", *accumulate, "--stop_at", "4")
    tiny_train(tiny, tmp_path / "b", *accumulate)
    resumed = calls[0::2]
    assert len(resumed) == len(full) and all(torch.equal(a, b) for a, b in zip(full, resumed))
