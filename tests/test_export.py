"""`dmc export`: a trained tiny DMC model round-trips through a HF folder to identical logits and greedy
generations, loaded in a fresh process with trust_remote_code and without the dmc package; bad input
gets one-line errors and leaves nothing half-written."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("deepspeed")

import dmc  # noqa: E402
from dmc.export import ExportError, save_folder  # noqa: E402
from dmc.train.export import export  # noqa: E402
from dmc.train.export import main as export_main
from dmc.train.run import main as train_main  # noqa: E402
from tests.helpers import (  # noqa: E402
    SMOLLM2,
    check_fresh_process_equals,
    one_line_exit,
    reference_outputs,
    write_tiny_checkpoint,
)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")
PROMPTS = ["def fibonacci(n):\n    ", "import os\n"]
# Offset 0 puts the merge logits at the decision boundary, so a few training steps give mixed decisions.
TRAIN = ["--config", str(ROOT / "configs/tiny.yaml"), "--model.dmc.logit_offset", "0.0"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tiny = str(write_tiny_checkpoint(root / "llama"))
    train_main([*TRAIN, "--model.path", tiny, "--run.out_dir", str(root / "run")])
    return root


def _expected_model(run: Path):
    """The trained model rebuilt from the Lightning checkpoint by hand (not through train/export.py)."""
    from transformers import AutoModelForCausalLM

    ckpt = torch.load(sorted((run / "run/ckpt").glob("step-*.ckpt"))[-1], map_location="cpu", weights_only=False)
    model = dmc.retrofit(AutoModelForCausalLM.from_pretrained(run / "llama"),
                         dmc.DMCConfig(target_cr=2.0, window=12, logit_offset=0.0))
    model.add_decision_adapters()
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state, strict=False)
    model.fold_decision_adapters()
    return model.eval()


def test_round_trip_in_a_fresh_process_without_dmc(run, tmp_path):

    folder = export(run / "run", tmp_path / "hf", dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dmc_llama" and config["auto_map"]["AutoModelForCausalLM"]
    assert {"modeling_dmc_llama.py", "configuration_dmc_llama.py", "model.safetensors", "README.md",
            "generation_config.json", "tokenizer.json"} <= {p.name for p in folder.iterdir()}
    assert "| tokens seen | 512 |" in (folder / "README.md").read_text()  # tiny.yaml: 8 steps x 2 x 32 tokens

    _check_fresh_process_equals(folder, _expected_model(run), tmp_path)


def _check_fresh_process_equals(folder: Path, expected, tmp_path: Path) -> None:
    check_fresh_process_equals(folder, expected, tmp_path, PROMPTS, "DMCCache")


def _reference_outputs(model, tok):
    return reference_outputs(model, tok, PROMPTS)


def test_save_pretrained_of_a_retrofitted_model_loads_in_a_fresh_process_without_dmc(run, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer

    model = _expected_model(run)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(run / "llama").save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
    _check_fresh_process_equals(folder, model, tmp_path)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and "dmc" in card.data.tags
    assert card.data.base_model is None  # never a local path in the metadata


def test_export_pushes_the_folder_to_the_hub(run, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    hub = tmp_path / "hub"

    class LocalHub:  # a stand-in for the Hub API: a repo is a folder under `hub`, a commit copies files in
        def create_repo(self, repo_id, repo_type, private, exist_ok):
            assert repo_type == "model" and exist_ok
            (hub / repo_id).mkdir(parents=True, exist_ok=True)
            return f"file://{hub / repo_id}"

        def upload_folder(self, repo_id, repo_type, folder_path, commit_message):
            shutil.copytree(folder_path, hub / repo_id, dirs_exist_ok=True)

    monkeypatch.setattr(huggingface_hub, "HfApi", LocalHub)
    export_main([str(run / "run"), "--out", str(tmp_path / "hf"), "--push-to-hub", "me/tiny-dmc"])
    printed = capsys.readouterr()
    assert f"pushed {tmp_path / 'hf'} to file://{hub / 'me/tiny-dmc'}" in printed.out
    assert [line.split("]")[0] for line in printed.err.splitlines() if line.startswith("dmc export [")] == \
        ["dmc export [1/3", "dmc export [2/3", "dmc export [3/3"]  # its progress, stage by stage
    files = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert sorted(p.name for p in (hub / "me/tiny-dmc").iterdir()) == files and "modeling_dmc_llama.py" in files
    assert all((hub / "me/tiny-dmc" / f).read_bytes() == (tmp_path / "hf" / f).read_bytes() for f in files)

    class OfflineHub(LocalHub):
        def create_repo(self, *args, **kwargs):
            raise OSError("Cannot reach https://huggingface.co: offline\nmore detail")

    monkeypatch.setattr(huggingface_hub, "HfApi", OfflineHub)
    message = one_line_exit(export_main, str(run / "run"), "--out", str(tmp_path / "hf2"), "--push-to-hub", "me/x")
    assert "pushing to 'me/x' failed (Cannot reach" in message and "hf upload me/x" in message
    assert (tmp_path / "hf2" / "model.safetensors").exists()  # the export itself is kept


def test_plain_from_pretrained_after_import_dmc_uses_the_dmc_cache(run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dmc.generate import generate, load

    folder = export(run / "run", tmp_path / "hf", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, dmc.DMCLlamaForCausalLM)
    expected = _expected_model(run)
    tok = AutoTokenizer.from_pretrained(folder)
    logits, gen = _reference_outputs(expected, tok)
    torch.testing.assert_close(_reference_outputs(model.eval(), tok)[0], logits, rtol=0, atol=0)
    model, tok = load(folder)
    out = generate(model, tok, PROMPTS, max_new_tokens=12)
    assert torch.equal(out.new_tokens, gen[:, -12:])
    assert out.kv_bytes > 0 and all(cr >= 1.0 for cr in out.realised_cr)


def test_bf16_export_is_the_default_and_equals_a_cast_of_the_fp32_export(run, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    folder = export(run / "run", tmp_path / "hf")
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    fp32 = export(run / "run", tmp_path / "hf32", dtype="float32")
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    cast = AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.bfloat16).eval()
    ids = torch.tensor([[1, 5, 9, 33, 2, 7]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, cast(ids).logits, rtol=0, atol=0)


def _one_line_error(capsys, *argv) -> str:
    message = one_line_exit(export_main, *argv)
    assert message.startswith("dmc export: error:")
    return message


def test_bad_input_is_refused_and_leaves_nothing(run, tmp_path, capsys):
    out = tmp_path / "hf"
    bogus = tmp_path / "bogus.ckpt"
    torch.save({"weights": 1}, bogus)
    assert "not a Lightning training checkpoint" in _one_line_error(capsys, str(bogus), "--out", str(out))
    assert "does not exist" in _one_line_error(capsys, str(tmp_path / "nope"), "--out", str(out))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(sorted((run / "run/ckpt").glob("step-*.ckpt"))[-1].read_bytes()[:4096])
    assert "not a readable checkpoint" in _one_line_error(capsys, str(truncated), "--out", str(out))
    plain = tmp_path / "plain.ckpt"
    ckpt = torch.load(sorted((run / "run/ckpt").glob("step-*.ckpt"))[-1], map_location="cpu", weights_only=False)
    torch.save({k: v for k, v in ckpt.items() if k != "dmc"}, plain)
    assert "not a DMC training checkpoint" in _one_line_error(capsys, str(plain), "--out", str(out))
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert "--overwrite" in _one_line_error(capsys, str(run / "run"), "--out", str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert not list(tmp_path.glob(".hf.exporting"))


class _RunsCode:
    """Unpickling this calls ``os.getcwd()``: it stands for any code a foreign checkpoint could carry."""

    def __reduce__(self):

        return (os.getcwd, ())


def test_a_checkpoint_that_would_run_code_is_refused_unless_trusted(run, tmp_path, capsys):
    latest = max((run / "run/ckpt").glob("step-*.ckpt"))
    state = {**torch.load(latest, map_location="cpu", weights_only=True), "extra": _RunsCode()}
    evil, out = tmp_path / "evil.ckpt", tmp_path / "hf"
    torch.save(state, evil)
    msg = _one_line_error(capsys, str(evil), "--out", str(out))
    assert "posix.getcwd" in msg and "--trust-checkpoint" in msg and not out.exists()
    shard = tmp_path / "ds.ckpt/checkpoint"  # a DeepSpeed folder: its shards are checked before DeepSpeed reads them
    shard.mkdir(parents=True)
    torch.save({"module": {}}, shard / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": _RunsCode()}, shard / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    msg = _one_line_error(capsys, str(shard.parent), "--out", str(out))
    assert "optim_states.pt holds a pickled posix.getcwd" in msg and not out.exists()
    export_main([str(evil), "--out", str(out), "--dtype", "float32", "--trust-checkpoint"])
    assert (out / "config.json").exists()


def test_a_failure_mid_export_leaves_no_folder(run, tmp_path, monkeypatch):
    import dmc.export as export_module

    def broken(*args):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "code_files", broken)
    with pytest.raises(OSError, match="disk full"):
        export(run / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".*exporting"))


def test_save_folder_refuses_a_vanilla_model(tmp_path):
    from tests.helpers import tiny_llama

    with pytest.raises(ExportError, match="needs a DMC or DMS model"):
        save_folder(tiny_llama(), tmp_path / "x")


# Export from a two-process ZeRO-2/3 checkpoint: checked on the runs of
# tests/test_stage_handover.py::test_handover_reaches_deepspeed_master_copy_and_exports_two_processes
# (tests.helpers.check_zero_export), so that each two-process run trains once.
