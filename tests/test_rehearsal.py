"""`dmc rehearse` on the shipped recipes, as a user runs it before spending GPU hours: the Llama 2 7B recipe
(ZeRO-2, 2 processes), the 70B recipe (ZeRO-3, GQA, as 2 nodes) and the 7B DMS recipe (gates only) end to end; every other recipe builds its
trainer and takes one step. And the SLURM script's dry run."""

import os
import subprocess

import pytest

pytest.importorskip("lightning")
pytest.importorskip("deepspeed")

from dmc.train.run import parse  # noqa: E402
from tests.helpers import ROOT, SMOLLM2, one_line_exit, run_dmc  # noqa: E402

pytestmark = pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")
FULL = {"llama2-7b-4x": [], "llama2-70b-4x": ["--nodes", "2"], "llama2-7b-dms8x": []}
CHECKS = ["miniature of the recipe", "uninterrupted run", "stage boundaries crossed", "validation",
          "SIGKILL one rank", "stage-1 -> 2 handover", "resume after the kill", "loss curve = uninterrupted run",
          "loggers across the resume", "export", "eval of the export", "generate from the export"]


def _rows(stdout: str) -> dict[str, str]:
    rows = {}
    for line in stdout.splitlines():
        for mark in ("  PASS  ", "  FAIL  ", "  skip  "):
            if mark in line:
                name, detail = line.split(mark, 1)
                rows[name.strip()] = mark.strip() + " " + detail
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL))
def test_full_rehearsal_of_a_paper_recipe(name):
    done = run_dmc("rehearse", "--config", f"configs/{name}.yaml", *FULL[name], timeout=1800)
    rows = _rows(done.stdout)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    for check in CHECKS:
        if check.startswith("stage-1") and "dms" in name:  # DMS gates start evicting nothing: no stage 1
            continue
        found = [row for key, row in rows.items() if key.startswith(check)]
        assert found and found[0].startswith("PASS"), f"{check}: {found}\n{done.stdout}"
    assert "max relative difference 0.0e+00" in rows["loss curve = uninterrupted run"]  # CPU: bit-identical


# A recipe whose miniature differs from a rehearsed one's only in the target CR runs the same code path: it is
# checked to be that twin (below) instead of taking its own step. The tiny recipe trains end to end in
# tests/test_train_pipeline.py. Every other recipe builds its trainer and takes one step.
TWINS = {"llama2-7b-2x": "llama2-7b-4x", "llama2-7b-8x": "llama2-7b-4x", "smollm2-135m-4x-cpu": "smollm2-135m-channel-cpu"}
OTHERS = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml") if p.stem not in {*FULL, *TWINS, "tiny"})


def _miniature(name: str) -> dict:
    from dmc.train.rehearsal.miniature import scale

    recipe = parse(["--config", str(ROOT / "configs" / f"{name}.yaml")])[0]
    return scale(recipe, ROOT / "run", "tiny-model", 2, 1, False, None)[0].to_dict()


@pytest.mark.parametrize("name", sorted(TWINS))
def test_a_recipe_not_stepped_has_a_rehearsed_twin(name):
    mine, twin = _miniature(name), _miniature(TWINS[name])
    assert TWINS[name] in {*FULL, *OTHERS}
    differ = sorted(f"{section}.{key}" for section, values in mine.items() for key, value in values.items()
                    if twin[section][key] != value)
    assert differ == ["schedule.target_cr"], differ


def test_a_dms_miniature_keeps_the_delays_share_of_the_block():
    """A delay as long as the miniature's block would evict nothing (and the warm start refuses it); the channel
    gate keeps its stage 1."""
    from dmc.train.rehearsal.miniature import BLOCK_LEN, scale

    mini = _miniature("smollm2-135m-dms2x-cpu")
    assert mini["data"]["block_len"] == BLOCK_LEN == 64 and mini["model"]["dms"]["window"] == 8  # 64 of 512 -> 8 of 64
    assert mini["schedule"]["stage1_steps"] == 0
    recipe = parse(["--config", str(ROOT / "configs/smollm2-135m-dms2x-cpu.yaml"), "--model.dms.gate", "channel",
                    "--model.trainable", "all", "--schedule.stage1_steps", "100", "--schedule.warm_start_blocks", "0"])[0]
    assert scale(recipe, ROOT / "run", "tiny-model", 1, 1, False, None)[0].schedule.stage1_steps == 1


def test_a_dmc_adapter_gate_miniature_has_no_stage_1_and_keeps_its_share_of_transfer():
    """The adapter gate starts merging nothing (a stage 1 would be refused); attention transfer keeps its share of
    the steps after stage 1."""
    from dmc.train.rehearsal.miniature import scale

    recipe = parse(["--config", str(ROOT / "configs/smollm2-135m-cpu.yaml"), "--model.dmc.gate", "adapter",
                    "--schedule.stage1_steps", "0", "--optim.decision_lr", "null", "--schedule.transfer_steps", "160"])[0]
    mini, changes = scale(recipe, ROOT / "run", "tiny-model", 1, 1, False, None)
    s = mini.schedule
    assert s.stage1_steps == 0 and s.transfer_steps == round(160 * (s.ramp_steps + s.finetune_steps) / 320)
    assert any(c.startswith("attention transfer 160 ->") for c in changes)
    mini.validate()


@pytest.mark.slow
@pytest.mark.parametrize("name", OTHERS)
def test_every_other_recipe_builds_its_trainer_and_takes_a_step(name, capsys):
    from dmc.train.rehearsal.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--quick", "--devices", "1"])
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    assert _rows(out)["trainer builds and takes one step"].startswith("PASS")


def test_bad_rehearsal_input_is_one_line(tmp_path):
    from dmc.cli import main

    # both refusals come before any run starts: the CLI's own main, in this process
    message = one_line_exit(main, "rehearse", "--config", "configs/nothing.yaml")
    assert "does not exist" in message
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    message = one_line_exit(main, "rehearse", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "full"))
    assert "is not empty" in message and (tmp_path / "full" / "x").exists()


def test_slurm_dry_run_prints_each_nodes_command(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_JOB_NODELIST="gpu-a,gpu-b", SLURM_NNODES="2", SLURM_JOB_ID="7", PATH="/usr/bin:/bin")
    done = subprocess.run(["bash", "scripts/slurm_train.sh", "--dry-run", "configs/llama2-70b-4x.yaml",
                           "--optim.lr=1e-5"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["node gpu-a", "node gpu-b"]
    command = lines[0].split(": ", 1)[1].split()
    assert command[:5] == ["torchrun", "--nnodes", "2", "--nproc_per_node", "8"]
    assert "--rdzv_endpoint" in command and command[command.index("--rdzv_endpoint") + 1] == "gpu-a:29500"
    train_args = command[command.index("train") + 1:]
    recipe = parse(train_args)[0]  # what each node runs is a valid recipe for this allocation
    assert (recipe.run.num_nodes, recipe.run.devices, recipe.optim.lr) == (2, 8, 1e-5)
    outside = subprocess.run(["bash", "scripts/slurm_train.sh", "--dry-run", "configs/tiny.yaml"], cwd=ROOT,
                             env={k: v for k, v in env.items() if not k.startswith("SLURM_")},
                             capture_output=True, text=True)
    assert outside.returncode != 0 and "not in a SLURM allocation" in outside.stderr


def test_every_recipe_model_has_a_known_layout_or_a_reachable_config():
    """A rehearsal on a machine that cannot reach the Hub builds its miniature from the known layouts: every
    shipped recipe's Hub model must be among them (a default MHA miniature would rehearse the wrong attention)."""
    from dmc.train.rehearsal.miniature import KNOWN_LAYOUTS

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        model = parse(["--config", str(path)])[0].model.path
        assert model.startswith("checkpoints/") or model in KNOWN_LAYOUTS, f"{path.name}: {model}"
