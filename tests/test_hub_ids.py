"""Hub ids as the recipes name them: a tiny model published into a temporary HF cache as
``meta-llama/Llama-2-7b-hf`` and every command run with ``HF_HUB_OFFLINE=1`` (the path a user's Hub id takes)."""

import json

import pytest

pytest.importorskip("lightning")

from dmc.train.hub_cache import publish_model  # noqa: E402
from tests.helpers import SMOLLM2, one_line_exit, run_dmc, write_tiny_checkpoint  # noqa: E402

pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")
HUB_ID = "meta-llama/Llama-2-7b-hf"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    publish_model(write_tiny_checkpoint(root / "tiny"), HUB_ID, root / "hf_home")
    return {"HF_HOME": str(root / "hf_home"), "HF_HUB_OFFLINE": "1"}


def _ok(result):
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def _one_line_error(result) -> str:
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return message


@pytest.mark.slow
def test_train_export_eval_generate_bench_from_a_hub_id(hub, tmp_path):
    run = tmp_path / "run"
    _ok(run_dmc("train", "--config", "configs/tiny.yaml", "--model.path", HUB_ID, "--run.out_dir", str(run),
                "--stop_at", "3", env=hub))
    _ok(run_dmc("export", str(run), "--out", str(tmp_path / "hf"), "--dtype", "float32", env=hub))  # tokenizer: the id
    assert (tmp_path / "hf" / "tokenizer.json").exists()
    _ok(run_dmc("export", str(run), "--out", str(tmp_path / "hf2"), "--tokenizer", HUB_ID, env=hub))
    text = _ok(run_dmc("generate", HUB_ID, "--prompt", "def add(a, b):", "--max-new-tokens", "4", env=hub))
    assert "--- prompt 0" in text
    _ok(run_dmc("eval", HUB_ID, "--tasks", "ppl", "--ppl-blocks", "2", "--ppl-block", "32", "--out",
                str(tmp_path / "eval"), env=hub))
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert list(results["models"]) == ["Llama-2-7b-hf"]
    _ok(run_dmc("bench", HUB_ID, "--contexts", "16", "--batches", "1", "--crs", "2", "--decode-steps", "2",
                "--out", str(tmp_path / "bench"), env=hub))
    assert json.loads((tmp_path / "bench" / "bench.json").read_text())["meta"]["synthetic"] is True


def test_an_unreachable_hub_id_is_one_line(hub, tmp_path, monkeypatch):
    missing = "nobody/missing-model"
    # the training command in a fresh process, as a user starts it
    message = _one_line_error(run_dmc("train", "--config", "configs/tiny.yaml", "--model.path", missing,
                                      "--run.out_dir", str(tmp_path / "r"), env=hub))
    assert f"'{missing}' is not on this machine" in message and "hf download" in message, message
    # the other commands resolve the id through the same dmc.hub, each from its own main: run here, offline
    import huggingface_hub.constants

    from dmc.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for command in (["generate", missing, "--prompt", "x"],
                    ["eval", missing, "--tasks", "ppl", "--out", str(tmp_path / "e")],
                    ["bench", missing, "--out", str(tmp_path / "b")]):
        message = one_line_exit(main, *command)
        assert f"'{missing}' is not on this machine" in message and "hf download" in message, message
