"""`make demo` (`dmc demo`): the packaged demo recipe trained end to end (here shortened, on a tiny model) and its
table printed; a run folder of another recipe is refused in one line, never a traceback."""

import json

import pytest

from tests.helpers import one_line_exit, write_tiny_checkpoint

SHORT = ["--schedule.ramp_steps", "3", "--schedule.finetune_steps", "2", "--schedule.transfer_steps", "1",
         "--data.block_len", "32", "--data.validation_blocks", "2", "--run.checkpoint_every", "2",
         "--run.progress_bar", "false", "--run.threads", "1"]


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("demo") / "tiny-llama")


@pytest.mark.slow
def test_the_demo_trains_its_recipe_and_prints_the_table(tiny_base, tmp_path, capsys):
    from dmc.cli import main

    out = tmp_path / "demo-run"
    main(["demo", "--model.path", str(tiny_base), "--run.out_dir", str(out), *SHORT])
    printed = capsys.readouterr().out
    assert "vanilla SmolLM2-135M" in printed and "DMC retrofit" in printed
    result = json.loads((out / "demo.json").read_text())
    assert result["dmc"]["cr"] >= 1 and result["vanilla"]["cr"] == 1
    recorded = (out / "config.yaml").read_text()
    assert "gate: adapter" in recorded and "transfer_steps: 1" in recorded  # the packaged demo recipe, shortened


def test_a_demo_folder_of_another_recipe_is_refused_in_one_line(tiny_base, tmp_path):
    """A user who ran an older demo recipe into the same folder gets one line naming the fix."""
    from dmc.cli import main

    out = tmp_path / "demo-run"
    args = ["demo", "--model.path", str(tiny_base), "--run.out_dir", str(out), *SHORT]
    main([*args, "--schedule.target_cr", "2.5"])  # an older recipe's run, with its checkpoints
    message = one_line_exit(main, *args)
    assert "holds a run of another recipe" in message and "--resume none" in message
