"""The packaged recipes: ``dmc recipes`` lists them and copies one out for editing, and ``--config`` takes a
recipe's name as well as a path. They ship in the wheel as ``dmc.configs`` package data."""

from __future__ import annotations

import argparse
import shutil
import sys
from importlib import resources
from pathlib import Path


class RecipeNotFound(ValueError):
    pass


def _folder():
    return resources.files("dmc.configs")


def names() -> list[str]:
    """The packaged recipes' names (file names without ``.yaml``), sorted."""
    return sorted(f.name.removesuffix(".yaml") for f in _folder().iterdir() if f.name.endswith(".yaml"))


def summary(name: str, width: int = 100) -> str:
    """The first sentence of a recipe's header comment (what it trains), cut to ``width`` characters."""
    words = []
    for line in (_folder() / f"{name}.yaml").read_text().splitlines():
        if not line.startswith("#") or line.lstrip("# ").startswith("Run:"):
            break
        words += line.lstrip("#").split()
    text = " ".join(words)
    end = text.find(". ")
    text = text[: end + 1] if end >= 0 else text
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def resolve(config: str) -> Path:
    """``config`` as a file: an existing path, else a packaged recipe's name (with or without ``.yaml``).

    A bare name that is neither is refused with the packaged names listed."""
    if Path(config).is_file():
        return Path(config)
    name = config.removesuffix(".yaml")
    if "/" not in name and name in names():
        return Path(str(_folder() / f"{name}.yaml"))
    what = f"config file {config!r} does not exist" if "/" in config or config.endswith(".yaml") else \
        f"{config!r} is not a packaged recipe"
    raise RecipeNotFound(f"{what}; the packaged recipes: {', '.join(names())} (`dmc recipes` describes them)")


def deepspeed_json(stage: int) -> Path:
    """The packaged DeepSpeed JSON of ZeRO stage ``stage``."""
    return Path(str(_folder() / "deepspeed" / f"zero{stage}.json"))


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(prog="dmc recipes", description="The packaged training recipes: list them, or copy "
                                 "one out to edit it and pass it to `dmc train --config PATH`.")
    sub = ap.add_subparsers(dest="action")
    sub.add_parser("ls", help="list the recipes (the default)")
    cp = sub.add_parser("cp", help="copy a recipe to a file to edit")
    cp.add_argument("name", help="a packaged recipe's name (see `dmc recipes`)")
    cp.add_argument("dest", nargs="?", help="the file or folder to write (default: NAME.yaml here)")
    cp.add_argument("--force", action="store_true", help="overwrite an existing file")
    ns = ap.parse_args(argv)
    if ns.action in (None, "ls"):
        width = max(map(len, names()))
        for name in names():
            print(f"{name:<{width}}  {summary(name)}")
        print("\nrun one: dmc train --config NAME; edit one: dmc recipes cp NAME [DEST]")
        return
    if ns.name not in names():
        sys.exit(f"error: no packaged recipe {ns.name!r}; packaged: {', '.join(names())}")
    dest = Path(ns.dest or f"{ns.name}.yaml")
    if dest.is_dir():
        dest = dest / f"{ns.name}.yaml"
    if not dest.parent.is_dir():
        sys.exit(f"error: folder {dest.parent} does not exist; create it or name another DEST")
    if dest.exists() and not ns.force:
        sys.exit(f"error: {dest} exists; pass --force to overwrite it or name another DEST")
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.copyfile(str(_folder() / f"{ns.name}.yaml"), tmp)
    tmp.replace(dest)  # atomic: never a half-copied recipe under DEST
    print(f"wrote {dest}; train it: dmc train --config {dest}")
