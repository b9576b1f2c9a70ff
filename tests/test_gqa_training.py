"""The GQA up-training baseline through the real pipeline: `dmc train` with model.method=gqa (same steps and
schedule as a DMC run), stop-and-resume, `dmc export` to a plain Llama folder, `dmc eval`/`dmc compare`
reporting its fixed CR."""

import json
from pathlib import Path

import pytest

pytest.importorskip("lightning")

from dmc.train.run import main  # noqa: E402
from tests.helpers import SMOLLM2, logged, one_line_exit, tiny_train, write_tiny_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("train/lm_loss", "train/realised_cr")
pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "llama", kind="mha"))  # 4 KV heads


def _train(tiny, out, *extra):
    tiny_train(tiny, out, "--model.method", "gqa", "--optim.decision_lr", "null", *extra)


def test_gqa_run_resumes_exports_and_evaluates_at_its_cr(tiny, tmp_path, capsys):
    _train(tiny, tmp_path / "a", "--schedule.target_cr", "4")  # 4 heads -> 1
    _train(tiny, tmp_path / "b", "--schedule.target_cr", "4", "--stop_at", "4")
    _train(tiny, tmp_path / "b", "--schedule.target_cr", "4")
    a, b = logged(tmp_path / "a", *KEYS), logged(tmp_path / "b", *KEYS)
    assert sorted(a) == list(range(8)) and a == b  # the same steps as the DMC recipe, and exact resume
    assert {cr for _, cr in a.values()} == {4.0}
    losses = [loss for loss, _ in a.values()]
    assert losses[-1] < losses[0]  # it does train (lr 1e-3 on a random tiny model)
    summary = json.loads((tmp_path / "a/summary.json").read_text())
    assert summary["validation"]["cr"] == 4.0
    assert (tmp_path / "a/loss_and_cr.png").exists() and not (tmp_path / "a/cr_heatmap.png").exists()

    from dmc.train.export import main as export_main

    export_main([str(tmp_path / "a"), "--out", str(tmp_path / "gqa-hf"), "--dtype", "float32"])
    config = json.loads((tmp_path / "gqa-hf/config.json").read_text())
    assert config["model_type"] == "llama" and config["num_key_value_heads"] == 1
    assert config["gqa_source_kv_heads"] == 4
    assert "tokens seen" in (tmp_path / "gqa-hf/README.md").read_text()
    import torch
    from transformers import AutoModelForCausalLM

    from dmc.gqa import pool_kv_heads
    from dmc.train.export import build_vanilla_model, load_checkpoint

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "gqa-hf", dtype=torch.float32)
    trained = build_vanilla_model(*load_checkpoint(tmp_path / "a"))
    untrained = pool_kv_heads(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), 1)
    ids = torch.randint(3, 1000, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained(ids).logits)
        assert not torch.allclose(exported(ids).logits, untrained(ids).logits, atol=1e-3)

    from dmc.eval.compare import main as compare_main

    compare_main([tiny, "--gqa", str(tmp_path / "gqa-hf"), "--policies", "streaming_llm", "--crs", "4",
                  "--tasks", "ppl", "--ppl-blocks", "2", "--ppl-block", "32", "--out", str(tmp_path / "cmp")])
    results = json.loads((tmp_path / "cmp/results.json").read_text())
    ppl = {name: m["tasks"]["ppl"] for name, m in results["models"].items()}
    assert ppl["gqa-hf"]["realised_cr"] == 4.0 and ppl["llama"]["realised_cr"] == 1.0
    assert results["models"]["gqa-hf"]["gqa"] == {"source_kv_heads": 4, "kv_heads": 1}
    assert "| gqa-hf | 4.00 |" in (tmp_path / "cmp/report.md").read_text()


def _error(*argv) -> str:
    return one_line_exit(main, *argv)


def test_gqa_recipes_that_cannot_fit_get_one_line_errors(tiny, tmp_path):
    base = ["--config", str(ROOT / "configs/tiny.yaml"), "--model.path", tiny, "--run.out_dir", str(tmp_path / "x")]
    assert "set it to null for model.method: gqa" in _error(*base, "--model.method", "gqa")  # tiny.yaml sets it
    base += ["--optim.decision_lr", "null"]
    msg = _error(*base, "--model.method", "gqa", "--schedule.target_cr", "3")
    assert "reaches only 1x, 2x, 4x" in msg and "model.kv_heads" in msg
    assert "must divide 4" in _error(*base, "--model.method", "gqa", "--model.kv_heads", "3")
    assert "model.kv_heads is for model.method: gqa" in _error(*base, "--model.kv_heads", "2")
    assert not (tmp_path / "x" / "ckpt").exists()
