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
    import dataclasses

    from dmc.config import DMCConfig
    from dmc.train.recipe import DMC_FIELDS, ModelSection
    from dmc.train.run import RecipeError

    defaults = {f.name: f.default for f in dataclasses.fields(DMCConfig)}
    assert set(DMC_FIELDS) == set(defaults) - {"enabled", "target_cr"}  # every DMC option has a model.* field
    assert all(getattr(ModelSection(), name) == defaults[name] for name in DMC_FIELDS)  # with one default
    recipe = parse(["--config", "tiny", "--model.weight_eps", "0.01", "--model.channel", "0",
                    "--model.decode_backend", "paged", "--model.block_size", "8"])[0]
    config = recipe.model.dmc_config(recipe.schedule.target_cr)
    assert (config.weight_eps, config.channel, config.decode_backend, config.block_size) == (0.01, 0, "paged", 8)
    with pytest.raises(RecipeError, match=r"^model\.block_size=0 is invalid"):
        parse(["--config", "tiny", "--model.block_size", "0"])
