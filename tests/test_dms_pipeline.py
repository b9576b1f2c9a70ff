"""DMS through the user's commands on a tiny model: `dmc train --config tiny-dms` (gates only, the base frozen and
teaching), `dmc export` to a folder that loads and generates in a fresh process without the dmc package, and one-line
errors for bad DMS input."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("lightning")

from transformers import AutoModelForCausalLM  # noqa: E402

import dmc  # noqa: E402
from dmc.train.export import export  # noqa: E402
from dmc.train.run import main as train_main  # noqa: E402
from tests.helpers import (  # noqa: E402
    SMOLLM2,
    check_fresh_process_equals,
    logged,
    one_line_exit,
    write_tiny_checkpoint,
)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")
TRAIN = ["--config", str(ROOT / "configs/tiny-dms.yaml"), "--model.dms.gate_offset", "0.5"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dms")
    tiny = str(write_tiny_checkpoint(root / "llama"))
    train_main([*TRAIN, "--model.path", tiny, "--run.out_dir", str(root / "run")])
    return root


def _trained(run: Path):
    """The trained model rebuilt by hand from the Lightning checkpoint (not through train/export.py)."""
    from transformers import AutoModelForCausalLM

    ckpt = torch.load(sorted((run / "run/ckpt").glob("step-*.ckpt"))[-1], map_location="cpu", weights_only=False)
    model = dmc.retrofit(AutoModelForCausalLM.from_pretrained(run / "llama"),
                         dmc.DMSConfig(target_cr=2.0, window=4, gate_offset=0.5))
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    return model.eval(), ckpt


def test_gates_only_training_follows_the_schedule_and_leaves_the_base(run):
    rows = logged(run / "run", "train/target_cr", "train/kl_loss", "train/realised_cr")
    assert sorted(rows) == list(range(6))
    assert [rows[s][0] for s in range(6)] == pytest.approx([dmc.cr_schedule(s, 2.0, 4) for s in range(6)])
    assert all(rows[s][1] >= 0 for s in rows)
    model, ckpt = _trained(run)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run / "llama").state_dict()
    for name, value in model.state_dict().items():
        if ".dms_gate." in name:
            continue
        assert torch.equal(value, base[name]), name  # frozen: bit for bit the source
    gates = [v for k, v in model.state_dict().items() if k.endswith("dms_gate.proj.weight")]
    assert gates and all(float(g.abs().sum()) > 0 for g in gates)  # they learned
    assert ckpt["dmc"]["method"] == "dms"


PROMPTS = ["def fibonacci(n):\n    if n < 2:\n        return n\n", "import os\n"]


def test_export_round_trips_in_a_fresh_process_without_dmc(run, tmp_path):
    folder = export(run / "run", tmp_path / "hf", dtype="float32")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dms_llama" and config["dms_window"] == 4
    assert {"modeling_dms_llama.py", "configuration_dms_llama.py", "README.md"} <= {p.name for p in folder.iterdir()}
    check_fresh_process_equals(folder, _trained(run)[0], tmp_path, PROMPTS, "DMSCache")
    # the folder continues training with its own gate, the frozen base teaching (no teacher is loaded)
    msg = one_line_exit(train_main, *TRAIN, "--model.path", str(folder), "--run.out_dir", str(tmp_path / "bad"),
                        "--model.dms.gate", "channel", "--model.trainable", "all", "--schedule.stage1_steps", "3")
    assert "continue it with model.dms.gate: adapter" in msg, msg
    train_main([*TRAIN, "--model.path", str(folder), "--run.out_dir", str(tmp_path / "more"), "--stop_at", "1"])
    assert sorted(logged(tmp_path / "more", "train/kl_loss")) == [0]


def test_channel_gate_fades_hands_over_and_exports(run, tmp_path):
    """The paper's gate through the user's commands: stage 1 evicts nothing while the channel fades, the handover
    zeroes the decision rows, then the CR loss takes over; the run exports to a folder that loads and generates in a
    fresh process without the package."""
    out = tmp_path / "channel"
    train_main([*TRAIN, "--model.path", str(run / "llama"), "--run.out_dir", str(out), "--model.dms.gate", "channel",
                "--model.trainable", "all", "--schedule.stage1_steps", "3"])
    rows = logged(out, "train/stage", "train/realised_cr", "train/target_cr")
    assert sorted(rows) == list(range(9))
    assert [rows[s][0] for s in range(9)] == [1, 1, 1, 2, 2, 2, 2, 3, 3]
    assert all(rows[s][1] == 1.0 and rows[s][2] == 1.0 for s in range(3))  # nothing evicted in stage 1
    assert any(rows[s][1] > 1.0 for s in range(3, 9))
    folder = export(out, tmp_path / "hf", dtype="float32")
    assert json.loads((folder / "config.json").read_text())["dms_gate"] == "channel"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert all(layer.dms_gate is None for layer in model.model.layers)
    check_fresh_process_equals(folder, model, tmp_path, PROMPTS, "DMSCache")
    # its channel already decides: it continues without a stage 1 (which would zero the trained rows)
    more = [*TRAIN, "--model.path", str(folder), "--model.dms.gate", "channel", "--model.trainable", "all",
            "--distill.teacher", str(run / "llama")]
    msg = one_line_exit(train_main, *more, "--run.out_dir", str(tmp_path / "bad"), "--schedule.stage1_steps", "3")
    assert "set schedule.stage1_steps: 0 to continue it" in msg, msg
    train_main([*more, "--run.out_dir", str(tmp_path / "more"), "--stop_at", "1"])
    assert logged(tmp_path / "more", "train/stage")[0] == (2.0,)


def test_the_channel_gate_handover_zeroes_its_rows_and_their_moments(run, tmp_path):
    """One stage-2 step after the handover, no decision row is further from zero than Adam's first step from fresh
    moments can move it (rows left as stage 1 trained them, or stale moments, exceed that bound)."""
    from dmc.train.export import load_checkpoint
    from dmc.train.handover import first_adam_step

    out = tmp_path / "channel"
    train_main([*TRAIN, "--model.path", str(run / "llama"), "--run.out_dir", str(out), "--model.dms.gate", "channel",
                "--model.trainable", "all", "--schedule.stage1_steps", "3", "--stop_at", "4"])
    state, info = load_checkpoint(out)
    c = info["config"]
    D, groups = c["hidden_size"] // c["num_attention_heads"], c["num_attention_heads"] // c["num_key_value_heads"]
    rows = torch.arange(c["num_key_value_heads"]) * groups * D + D - 1
    bound = first_adam_step(1.0e-3, 4, (0.9, 0.95))  # configs/tiny-dms.yaml's lr; Adam's step count 4
    for i in range(c["num_hidden_layers"]):
        q = state[f"model.layers.{i}.self_attn.q_proj.weight"]
        assert float(q[rows].abs().max()) <= bound * (1 + 1e-4), i
        assert float(q[rows - 1].abs().max()) > bound  # the channel beside it is the model's own


def test_the_channel_gate_on_a_llama_needs_a_stage1(run, tmp_path):
    msg = one_line_exit(train_main, *TRAIN, "--model.path", str(run / "llama"), "--run.out_dir", str(tmp_path / "r"),
                        "--model.dms.gate", "channel", "--model.trainable", "all")
    assert "set schedule.stage1_steps > 0" in msg, msg
    assert not (tmp_path / "r").exists()


def test_a_stage1_checkpoint_of_the_channel_gate_is_not_exported():
    from dmc.train.export import ExportError, build_dms_model

    info = {"step": 3, "recipe": {"schedule": {"stage1_steps": 3}}, "config": {}}
    with pytest.raises(ExportError, match="from stage 1"):
        build_dms_model({}, info)


@pytest.mark.parametrize("extra, words", [
    (["--model.dms.window", "0"], "model.dms.window=0 is invalid"),
    (["--model.dms.gate", "channel", "--schedule.stage1_steps", "5"], "set model.trainable: all"),
    (["--model.dms.gate", "channel", "--schedule.stage1_steps", "5", "--model.trainable", "all",
      "--schedule.warm_start_blocks", "4"], "remove it for model.dms.gate: channel"),
    (["--model.dms.gate", "neuron"], "model.dms.gate='neuron' is invalid"),
    (["--schedule.target_cr", "0.5"], "schedule.target_cr=0.5 must be >= 1"),
    (["--distill.teacher", "someone/else"], "remove distill.teacher, or set model.trainable: all"),
    (["--schedule.stage1_steps", "5"], "set schedule.stage1_steps: 0"),
    (["--model.method", "dmc"], "the channel gate has no parameters of its own"),
])
def test_bad_dms_input_is_one_line(tmp_path, extra, words):
    msg = one_line_exit(train_main, *TRAIN, "--model.path", str(tmp_path / "nowhere"),
                        "--run.out_dir", str(tmp_path / "run"), *extra)
    assert words in msg, msg
    assert not (tmp_path / "run").exists()


def test_gate_labels_mark_the_least_attended_keys_for_the_next_token():
    from dmc.train.warm_start import gate_labels

    scores = torch.tensor([[[0.5, 0.1, 0.9, 0.2, float("nan"), float("nan")]]])  # keys 4, 5: no later query
    labels, mask = gate_labels(scores, 0.5)
    # the two least attended of the four known keys are 1 and 3: tokens 2 and 4 flag them
    assert labels[0, 0].tolist() == [0, 0, 1, 0, 1, 0]
    assert mask[0, 0].tolist() == [False, True, True, True, True, False]


def test_a_warm_start_fits_gates_that_evict_about_the_target_share(tmp_path):
    """Forward passes only: after the fit, the hard gates evict a share of the block near what the target CR
    needs, where zero gates evict nothing."""
    from transformers import AutoModelForCausalLM

    from dmc.train.warm_start import warm_start

    model = dmc.retrofit(AutoModelForCausalLM.from_pretrained(write_tiny_checkpoint(tmp_path / "llama")),
                         dmc.DMSConfig(window=4))
    blocks = torch.randint(10, 1000, (6, 48), generator=torch.Generator().manual_seed(0))
    assert int(model(blocks, use_cache=False).dms_evicted.sum()) == 0
    warm_start(model, blocks, cr=2.0, steps=300)
    out = model.eval()(blocks, use_cache=False)
    L, _, H = out.dms_evicted.shape
    held_in = float(out.dms_tokens.sum()) * L * H  # every (layer, sequence, head)'s tokens
    realised = held_in / (held_in - float(out.dms_evicted.sum()))
    assert 1.5 < realised < 2.6, realised


def test_a_run_with_a_warm_start_trains(run, tmp_path):
    train_main([*TRAIN, "--model.path", str(run / "llama"), "--run.out_dir", str(tmp_path / "warm"),
                "--schedule.warm_start_blocks", "2"])
    rows = logged(tmp_path / "warm", "train/realised_cr")
    assert sorted(rows) == list(range(6)) and rows[0][0] > 1.0  # it evicts from the first step
