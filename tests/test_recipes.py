"""The packaged recipes: `dmc recipes` lists every YAML under configs/ (shipped as dmc.configs), copies one out
for editing, and `dmc train --config NAME` takes a packaged name as well as a path."""

from pathlib import Path

import pytest

from dmc.cli import main as dmc_main
from dmc.train import recipes
from dmc.train.run import parse
from tests.helpers import ROOT, one_line_exit


def test_every_recipe_in_configs_is_packaged_and_listed(capsys):
    shipped = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert recipes.names() == shipped
    dmc_main(["recipes"])
    lines = capsys.readouterr().out.splitlines()
    for name in shipped:
        line = next(x for x in lines if x.split()[:1] == [name])
        assert len(line.split(maxsplit=1)) == 2, f"{name} has no description"


def test_a_recipe_name_and_its_path_give_the_same_recipe():
    assert recipes.resolve("tiny") == recipes.resolve("tiny.yaml")
    assert recipes.resolve("tiny").read_text() == (ROOT / "configs/tiny.yaml").read_text()
    by_name = parse(["--config", "tiny", "--run.out_dir", "x"])[0]
    by_path = parse(["--config", str(ROOT / "configs/tiny.yaml"), "--run.out_dir", "x"])[0]
    assert by_name == by_path
    assert recipes.deepspeed_json(3).read_text() == (ROOT / "configs/deepspeed/zero3.json").read_text()


def test_an_unknown_recipe_is_refused_with_the_packaged_names(tmp_path):
    from dmc.train.run import main as train_main

    message = one_line_exit(train_main, "--config", "llama2-7b-5x")
    assert "'llama2-7b-5x' is not a packaged recipe" in message and "llama2-7b-4x" in message
    assert "tiny" in one_line_exit(dmc_main, "recipes", "cp", "nope", str(tmp_path))


def test_recipes_cp_writes_an_editable_copy_and_never_overwrites_silently(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dmc_main(["recipes", "cp", "tiny"])
    copy = tmp_path / "tiny.yaml"
    assert copy.read_text() == (ROOT / "configs/tiny.yaml").read_text()
    copy.write_text(copy.read_text() + "# edited\n")
    assert "exists; pass --force" in one_line_exit(dmc_main, "recipes", "cp", "tiny")
    assert copy.read_text().endswith("# edited\n")
    dmc_main(["recipes", "cp", "tiny", str(tmp_path), "--force"])
    assert copy.read_text() == (ROOT / "configs/tiny.yaml").read_text()
    assert "does not exist" in one_line_exit(dmc_main, "recipes", "cp", "tiny", str(tmp_path / "no" / "x.yaml"))
    assert sorted(p.name for p in Path(tmp_path).iterdir()) == ["tiny.yaml"]  # no temporary file left behind


def test_every_dmc_option_is_settable_from_a_recipe_with_dmc_configs_default():
    from dmc.config import DMCConfig
    from dmc.train.run import RecipeError

    assert parse(["--config", "tiny"])[0].model.dmc == DMCConfig(window=12)  # model.dmc is DMCConfig itself
    recipe = parse(["--config", "tiny", "--model.dmc.weight_eps", "0.01", "--model.dmc.channel", "0",
                    "--model.dmc.decode_backend", "paged", "--model.dmc.block_size", "8"])[0]
    config = recipe.model.dmc_config(recipe.schedule.target_cr)
    assert (config.weight_eps, config.channel, config.decode_backend, config.block_size) == (0.01, 0, "paged", 8)
    assert config.target_cr == recipe.schedule.target_cr
    with pytest.raises(RecipeError, match=r"^model\.dmc\.block_size=0 is invalid"):
        parse(["--config", "tiny", "--model.dmc.block_size", "0"])
    with pytest.raises(RecipeError, match=r"take their target CR from schedule.target_cr"):
        parse(["--config", "tiny", "--model.dmc.target_cr", "3"])


def test_a_run_recorded_with_flat_dmc_fields_resumes_under_the_nested_section():
    """Run folders recorded before model.dmc existed hold the DMC fields flat under model: the same settings
    nested are no change, a changed one is named by its new place, and the exported model's inference fields
    may change."""
    from dmc.train.run import recipe_changes

    new = parse(["--config", "tiny"])[0].to_dict()
    old = {**new, "model": {k: v for k, v in new["model"].items() if k != "dmc"} | {"window": 12, "tau": 0.1}}
    assert recipe_changes(old, new) == []
    assert recipe_changes({**old, "model": {**old["model"], "window": 4}}, new) == ["model.dmc.window: 4 -> 12"]
    changed = {**new, "model": {**new["model"], "dmc": {**new["model"]["dmc"], "decode_backend": "sdpa"}}}
    assert recipe_changes(new, changed) == []


def test_plan_prints_the_recipe_scaled_in_every_stage_and_its_tokens(capsys, tmp_path):
    """`dmc train --scale K --plan`: every stage of the schedule times K (a tokens curve's point), nothing trained."""
    import json

    from dmc.train.run import main as train_main

    base = ["--config", "tiny", "--schedule.transfer_steps", "2", "--run.out_dir", str(tmp_path / "run")]
    train_main([*base, "--plan"])
    one = json.loads(capsys.readouterr().out)
    train_main([*base, "--scale", "3", "--plan"])
    three = json.loads(capsys.readouterr().out)
    lengths = ("stage1_steps", "ramp_steps", "finetune_steps", "transfer_steps")
    assert [three["recipe"]["schedule"][k] for k in lengths] == [3 * one["recipe"]["schedule"][k] for k in lengths]
    assert three["steps"] == 3 * one["steps"] and three["tokens"] == 3 * one["tokens"]
    data = one["recipe"]["data"]
    assert one["tokens"] == one["steps"] * data["batch_size"] * data["block_len"] * \
        one["recipe"]["optim"]["accumulate_grad_batches"]
    del one["recipe"]["schedule"], three["recipe"]["schedule"]
    assert one["recipe"] == three["recipe"]  # the length is all a scale changes
    assert not (tmp_path / "run").exists()
    assert "--scale 0: use a whole number >= 1" in one_line_exit(train_main, *base, "--scale", "0", "--plan")
    # a run folder holding another recipe is refused by the plan, as resuming it would be
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(json.dumps({**one["recipe"], "optim": {"lr": 0.5}}))
    assert "holds a run of another recipe (optim.lr: 0.5 -> " in one_line_exit(train_main, *base, "--plan")


def test_plan_checks_only_a_run_folder_it_is_given(capsys, tmp_path, monkeypatch):
    """A plan without --run.out_dir (a curve asking a point's tokens) does not check the recipe's default folder,
    which may hold the user's own run of another length (make demo's, for a curve point of the demo recipe)."""
    import json

    from dmc.train.run import main as train_main

    monkeypatch.chdir(tmp_path)
    default = tmp_path / "checkpoints" / "tiny-run"  # configs/tiny.yaml's run.out_dir
    default.mkdir(parents=True)
    (default / "config.yaml").write_text(json.dumps({"optim": {"lr": 0.5}}))
    train_main(["--config", "tiny", "--scale", "2", "--plan"])
    assert json.loads(capsys.readouterr().out)["steps"] > 0
    assert "holds a run of another recipe" in one_line_exit(train_main, "--config", "tiny", "--plan",
                                                            "--run.out_dir", str(default))


def test_only_dmc_train_prints_a_plan():
    """`dmc demo --plan` must not train for 14 minutes: the option belongs to `dmc train`."""
    from dmc.cli import main as dmc_main

    assert "--plan" in one_line_exit(dmc_main, "demo", "--plan")
