"""A recipe trial's perplexity over the LM-only control's and the vanilla model's on the same blocks, with paired 95%
intervals (docs/recipe_search.md's "vs control" columns).

    python bench/trial_paired.py NAME [--against eval/results/compare-135m]

Reads the trial's items (eval/results/search/NAME/items, written by bench/recipe_trial.sh) and the comparison's
items of the control and the vanilla model (the same 32 x 512-token code and prose blocks; each block's text hash is
checked), writes eval/results/search/NAME/paired.json and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dmc.eval.intervals import paired_ppl_ratio
from dmc.eval.store import read_items

REFERENCES = {"control": "smollm2-135m-control-hf", "vanilla": "smollm2-135m"}


def items_of(folder: Path, name: str, task: str) -> dict:
    (path,) = [p for p in (folder / "items").glob(f"{name}.{task}.*.jsonl")
               if read_items(p)[0]["settings"].get("ppl_blocks") == 32]
    return read_items(path)[1]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("name")
    ap.add_argument("--against", default="eval/results/compare-135m", help="the protocol folder holding the "
                    "control's and the vanilla model's items")
    ns = ap.parse_args(argv)
    trial = Path("eval/results/search") / ns.name
    (model,) = json.loads((trial / "results.json").read_text())["models"]
    out = {"trial": ns.name}
    for task in ("ppl", "ppl_prose"):
        mine = items_of(trial, model, task)
        for ref, name in REFERENCES.items():
            theirs = items_of(Path(ns.against), name, task)
            if any(mine[i]["data"] != theirs[i]["data"] for i in mine if i in theirs):
                sys.exit(f"trial_paired: {ns.name} and {name} scored different {task} blocks: rerun the trial")
            r = paired_ppl_ratio(mine, theirs, names=(model, name))
            out[f"{task}_vs_{ref}"] = {"ratio": round(r["ratio"], 4), "ci95": [round(x, 4) for x in r["ci95"]],
                                       "blocks": r["items"]}
    (trial / "paired.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
