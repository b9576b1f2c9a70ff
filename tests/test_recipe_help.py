"""`dmc train --help` describes every recipe field: the help is the docstrings of train/recipe.py's sections."""

import dataclasses

import pytest

from dmc.train.recipe import Recipe


def _fields() -> list[str]:
    return [f"{section.name}.{field.name}" for section in dataclasses.fields(Recipe)
            for field in dataclasses.fields(section.default_factory)]


def test_train_help_describes_every_recipe_field(capsys):
    from dmc.train.run import main

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare words
    from dmc.train.run import parser

    helps = {action.dest: action.help for action in parser()._actions}
    missing = [name for name in _fields() if not (helps.get(name) or "").strip()]
    assert not missing, f"recipe fields without a description: {missing}"
    for name in _fields():
        assert f"--{name}" in text and " ".join(helps[name].split()[:3]) in text, name
