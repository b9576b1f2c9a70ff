"""What a run folder holds across resumes: one CSV / TensorBoard version and one W&B run, the resolved recipe,
the recipe as hyperparameters, validation every run.validate_every steps and at the end, and nothing that a
killed run wrote after its last checkpoint."""

import csv
import json

import pytest
import yaml

pytest.importorskip("lightning")

from dmc.train.run import main, parse  # noqa: E402
from tests.helpers import SMOLLM2, one_line_exit, tiny_train, write_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama"))


def _csv_steps(run) -> list[int]:
    rows = list(csv.DictReader(open(run / "logs" / "version_0" / "metrics.csv")))
    return [int(r["step"]) for r in rows if r.get("train/lm_loss")]


def _kill_after(run, keep_step: int) -> None:
    """What a run killed after checkpoint `keep_step` leaves: later steps logged, their checkpoint gone."""
    ckpt = run / "ckpt"
    for path in ckpt.glob("step-*.ckpt"):
        if int(path.name[5:12]) > keep_step:
            path.unlink()
    (ckpt / "latest").write_text(f"step-{keep_step:07d}.ckpt")
    (ckpt / f"step-{keep_step + 1:07d}.ckpt.tmp").write_text("half-written")


def test_one_log_history_and_one_wandb_run_across_a_killed_run(tiny, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    loggers = ["--run.loggers", "[csv, wandb, tensorboard]", "--run.validate_every", "2"]
    tiny_train(tiny, run, *loggers, "--stop_at", "6")
    _kill_after(run, 4)  # steps 4 and 5 were logged, then the run died before its next checkpoint
    tiny_train(tiny, run, *loggers)
    assert _csv_steps(run) == list(range(8)), "every step logged exactly once"
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0"]
    assert sorted(p.name for p in (run / "tb").iterdir()) == ["version_0"]
    assert not list((run / "ckpt").glob("*.tmp")), "the half-written checkpoint is gone"
    run_id = (run / "wandb_id").read_text().strip()
    offline = sorted(p.name for p in (run / "wandb").glob("offline-run-*"))
    assert offline and all(name.endswith(run_id) for name in offline), offline
    telemetry = [json.loads(line)["step"] for line in (run / "telemetry.jsonl").read_text().splitlines()]
    assert telemetry == sorted(set(telemetry))
    validation = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert [v["step"] for v in validation] == [2, 4, 6, 8]
    assert all(v["perplexity"] > 1 and v["cr"] >= 1 for v in validation)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["validation"]["step"] == 8
    hparams = yaml.safe_load((run / "logs" / "version_0" / "hparams.yaml").read_text())
    assert hparams["schedule"]["target_cr"] == 2.0 and hparams["model"]["path"] == tiny


def test_the_resolved_recipe_is_saved_and_runs_again(tiny, tmp_path):
    run = tmp_path / "run"
    tiny_train(tiny, run, "--stop_at", "1", "--schedule.target_cr", "3.5")
    header = (run / "config.yaml").read_text().splitlines()[0]
    assert header.startswith("#") and "dmc train --config" in header
    again = parse(["--config", str(run / "config.yaml")])[0]
    assert again.schedule.target_cr == 3.5 and again.model.path == tiny and again.run.out_dir == str(run)


def _one_line(capsys, *argv) -> str:
    return one_line_exit(main, *argv)


def test_recipes_that_would_validate_on_training_data_are_refused(tiny, tmp_path, capsys):
    base = ["--config", "configs/tiny.yaml", "--model.path", tiny, "--run.out_dir", str(tmp_path / "x")]
    msg = _one_line(capsys, *base, "--data.validation_split", "train")
    assert "is the training split" in msg and "holdout" in msg
    msg = _one_line(capsys, *base, "--data.kind", "files", "--data.path", "x/*.jsonl", "--data.validation_split",
                    "validation")
    assert "data.kind=files has no splits" in msg


@pytest.mark.parametrize("name,hint", [("fsdp", "FSDP is not supported"),
                                       ("deepspeed_stage_3_offload", "offload is not supported"),
                                       ("deepspeed_stage_9", "not one of auto, ddp, deepspeed_stage_2")])
def test_strategy_names_are_parsed_strictly(tiny, tmp_path, capsys, name, hint):
    msg = _one_line(capsys, "--config", "configs/tiny.yaml", "--model.path", tiny, "--run.strategy", name)
    assert f"run.strategy={name!r}" in msg and hint in msg


def test_a_deepspeed_config_with_offload_is_refused(tiny, tmp_path, capsys):
    config = tmp_path / "ds.json"
    config.write_text(json.dumps({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}))
    msg = _one_line(capsys, "--config", "configs/tiny.yaml", "--model.path", tiny, "--run.out_dir", str(tmp_path / "r"),
                    "--run.strategy", "deepspeed_stage_3", "--run.accelerator", "cpu",
                    "--run.deepspeed_config", str(config))
    assert "offload_optimizer is not supported" in msg


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks a machine without GPUs")
def test_a_gpu_recipe_on_a_machine_without_gpus_names_the_override(tmp_path, capsys):
    msg = _one_line(capsys, "--config", "configs/llama2-7b-4x.yaml", "--run.out_dir", str(tmp_path / "r"))
    assert "no CUDA GPU" in msg and "dmc rehearse" in msg and "--run.accelerator cpu" in msg


def test_the_cuda_training_attention_on_a_cpu_run_names_the_fallback(tiny, tmp_path, capsys):
    msg = _one_line(capsys, "--config", "configs/tiny.yaml", "--model.path", tiny, "--run.out_dir", str(tmp_path / "r"),
                    "--run.accelerator", "cpu", "--model.dmc.train_attention", "triton")
    assert "train_attention=triton is a CUDA kernel" in msg and "--model.dmc.train_attention auto" in msg
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_a_launcher_that_disagrees_with_the_recipe_names_the_override(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    msg = _one_line(capsys, "--config", "configs/tiny.yaml", "--model.path", tiny, "--run.out_dir", str(tmp_path / "r"))
    assert "torchrun started 2 process(es) per node but run.devices=1" in msg and "--run.devices 2" in msg


def test_starting_a_folder_over_keeps_the_old_checkpoints_aside_and_the_new_ones_alive(tiny, tmp_path):
    """`--resume none` into a folder with a longer run's checkpoints: pruned by step number, the old ones would
    outlive every new one (each new checkpoint deleted as soon as written). They are moved aside, not lost."""
    from dmc.train.callbacks import AtomicCheckpoint

    run = tmp_path / "run"
    every = ["--run.checkpoint_every", "2", "--run.keep_last", "1"]
    tiny_train(tiny, run, *every, "--stop_at", "4")
    assert AtomicCheckpoint.latest(str(run)).endswith("step-0000004.ckpt")
    tiny_train(tiny, run, *every, "--stop_at", "2", "--resume", "none")
    latest = AtomicCheckpoint.latest(str(run))
    assert latest is not None and latest.endswith("step-0000002.ckpt")
    assert [p.name for p in (run / "ckpt.replaced-1").glob("step-*.ckpt")] == ["step-0000004.ckpt"]
