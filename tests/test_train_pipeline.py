"""The real CLI on a tiny model: schedule in the metrics, stop-and-resume equality, every YAML recipe loads, and
one-line errors for bad input. (DeepSpeed ZeRO-2/3 with two processes, kill and resume: tests/test_rehearsal.py.)"""

from pathlib import Path

import pytest

pytest.importorskip("lightning")
pytest.importorskip("deepspeed")

import dmc  # noqa: E402
from dmc.train.run import main, parse  # noqa: E402
from tests.helpers import SMOLLM2, logged, one_line_exit, tiny_train, write_tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama"))


def _losses(out_dir) -> dict[int, tuple[float, ...]]:
    return logged(out_dir, "train/lm_loss", "train/target_cr")


def _train(tiny, out, *extra):
    tiny_train(tiny, out, *extra)


def test_tiny_run_follows_the_cr_schedule(tiny, tmp_path):
    _train(tiny, tmp_path / "run")
    rows = _losses(tmp_path / "run")
    assert sorted(rows) == list(range(8))
    expected = [dmc.cr_schedule(s, 2.0, 4, start_step=2) for s in range(8)]
    assert [rows[s][1] for s in range(8)] == pytest.approx(expected)
    assert expected[:3] == [1.0, 1.0, 1.0] and expected[-1] == 2.0
    for name in ("loss_and_cr.png", "cr_heatmap.png", "telemetry.jsonl", "summary.json", "ckpt/latest"):
        assert (tmp_path / "run" / name).exists(), name
    assert len(list((tmp_path / "run/ckpt").glob("step-*.ckpt"))) == 2  # keep_last


def test_stop_and_resume_equals_uninterrupted(tiny, tmp_path):
    _train(tiny, tmp_path / "a")
    _train(tiny, tmp_path / "b", "--stop_at", "4")
    assert (tmp_path / "b/ckpt/step-0000004.ckpt").exists()
    _train(tiny, tmp_path / "b")  # --resume auto picks ckpt/latest
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b")


def test_resuming_under_a_changed_recipe_is_refused(tiny, tmp_path, capsys):
    _train(tiny, tmp_path / "run", "--stop_at", "4")
    before = _losses(tmp_path / "run")
    msg = _error(capsys, "--config", str(ROOT / "configs/tiny.yaml"), "--model.path", tiny,
                 "--run.out_dir", str(tmp_path / "run"), "--schedule.target_cr", "3")
    assert "another recipe" in msg and "schedule.target_cr: 2.0 -> 3.0" in msg and "--resume none" in msg
    assert _losses(tmp_path / "run") == before  # nothing trained, nothing rewritten
    _train(tiny, tmp_path / "run", "--run.keep_last", "3", "--run.progress_bar", "false")  # how it runs may change
    assert sorted(_losses(tmp_path / "run")) == list(range(8))


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_loads_and_names_its_command(path):
    recipe = parse(["--config", str(path)])[0]
    assert recipe.total_steps > 0
    header = path.read_text().splitlines()[:6]
    assert any("dmc" in line and "train" in line for line in header if line.startswith("#")), "run command in header"


def _error(capsys, *argv) -> str:
    return one_line_exit(main, *argv)


def test_bad_inputs_get_one_line_errors(tiny, tmp_path, capsys):
    cfg = str(ROOT / "configs/tiny.yaml")
    base = ["--config", cfg, "--model.path", tiny, "--run.out_dir", str(tmp_path / "x")]
    assert "target_cr=0.5 must be >= 1" in _error(capsys, *base, "--schedule.target_cr", "0.5")
    assert "ramp_steps" in _error(capsys, *base, "--schedule.ramp_steps", "many")
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("schedule:\n  target_ratio: 4\n")
    msg = _error(capsys, "--config", str(bad_yaml))
    assert "unknown key 'schedule.target_ratio'" in msg and "target_cr" in msg
    assert "does not exist" in _error(capsys, "--config", str(tmp_path / "missing.yaml"))
    msg = _error(capsys, *base, "--data.kind", "files", "--data.path", str(tmp_path / "none/*.jsonl"))
    assert "matches no file" in msg

    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    msg = _error(capsys, "--config", cfg, "--model.path", str(tmp_path / "gpt2"), "--run.out_dir", str(tmp_path / "g"))
    assert "'gpt2' model" in msg and "Llama-architecture" in msg

    _train(tiny, tmp_path / "run", "--stop_at", "2")
    other = str(write_tiny_checkpoint(tmp_path / "other", kind="mha"))
    from transformers import AutoConfig, LlamaForCausalLM

    config = AutoConfig.from_pretrained(other)
    config.hidden_size = 128
    LlamaForCausalLM(config).save_pretrained(other)
    msg = _error(capsys, "--config", cfg, "--model.path", other, "--run.out_dir", str(tmp_path / "run"))
    assert "from another model" in msg


class _RunsCode:
    """Unpickling this calls ``os.getcwd()``: it stands for any code a foreign checkpoint could carry."""

    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_resuming_from_a_checkpoint_that_would_run_code_is_refused_unless_trusted(tiny, tmp_path, capsys):
    import torch

    _train(tiny, tmp_path / "run", "--stop_at", "4")
    ckpt = tmp_path / "run/ckpt/step-0000004.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # what we write loads without trust
    torch.save({**state, "extra": _RunsCode()}, ckpt)
    before = _losses(tmp_path / "run")
    msg = _error(capsys, "--config", str(ROOT / "configs/tiny.yaml"), "--model.path", tiny,
                 "--run.out_dir", str(tmp_path / "run"))
    assert "posix.getcwd" in msg and "--trust-checkpoint" in msg
    assert _losses(tmp_path / "run") == before  # nothing trained, nothing rewritten
    _train(tiny, tmp_path / "run", "--trust-checkpoint")
    assert sorted(_losses(tmp_path / "run")) == list(range(8))


def _bars(err: str) -> list[str]:
    """The training bar's states, in the order printed (tqdm rewrites its line with carriage returns)."""
    return [part for part in err.replace("\r", "\n").splitlines() if part.startswith("train:")]


def test_the_training_bar_counts_optimiser_steps_and_resumes_at_its_step(tiny, tmp_path, capfd):
    """Under accumulation the bar's total and rate are optimiser steps (4), not micro-batches (8) or epochs;
    a resumed run's bar starts at its checkpoint's step."""
    out = tmp_path / "run"
    args = ["--optim.accumulate_grad_batches", "2", "--run.progress_bar", "true", "--schedule.ramp_steps", "1",
            "--schedule.finetune_steps", "1"]  # stages 2 / 1 / 1
    tiny_train(tiny, out, *args, "--stop_at", "2")
    first = _bars(capfd.readouterr().err)[-1]
    assert " 2/2 " in first and "stage=1" in first, first  # the bar runs to where this invocation stops
    tiny_train(tiny, out, *args)
    err = capfd.readouterr().err
    assert "Epoch" not in err
    bars = _bars(err)
    assert " 2/4 " in bars[0] and " 4/4 " in bars[-1] and "stage=3" in bars[-1], bars
