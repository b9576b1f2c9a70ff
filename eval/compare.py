"""``dmc compare``: the vanilla model, DMC checkpoints and every training-free policy at matched
compression, on the same tasks, in one table and one quality-versus-CR (Pareto) plot per task.

    dmc compare VANILLA_DIR --dmc DMC_DIR [...] --gqa GQA_DIR [...] --policies all --crs 2 4 8 \
        --tasks ppl needle --out DIR

Every other option is ``dmc eval``'s (task sizes, batch size, device...). Finished items are cached
under DIR/items, so rerunning continues an interrupted comparison.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .run import evaluate, parser as eval_parser
from .tasks import TaskError


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="dmc compare", description=__doc__, add_help=True,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vanilla", help="the vanilla Llama folder (also the base of every policy)")
    ap.add_argument("--dmc", nargs="*", default=[], help="exported DMC folders")
    ap.add_argument("--gqa", nargs="*", default=[], help="GQA baseline folders (dmc gqa-convert, then dmc train "
                    "with model.method: gqa and dmc export)")
    ap.add_argument("--policies", nargs="+", default=["all"], help="policy names, or 'all'")
    ap.add_argument("--crs", type=float, nargs="+", default=[2, 4, 8], help="policy budgets as CRs")
    ours, rest = ap.parse_known_args(argv)
    from .policies import POLICIES, Budget

    names = sorted(POLICIES) if ours.policies == ["all"] else ours.policies
    unknown = [n for n in names if n not in POLICIES]
    bad_cr = [c for c in ours.crs if c < 1]
    opts = eval_parser().parse_args([ours.vanilla, *ours.dmc, *ours.gqa, *rest])
    try:
        if unknown:
            raise TaskError(f"unknown policy {unknown[0]!r}; choose from {', '.join(sorted(POLICIES))} or 'all'")
        if bad_cr:
            raise TaskError(f"--crs {bad_cr[0]:g}: every CR must be >= 1")
        variants = [(ours.vanilla, None)] + [(d, None) for d in ours.dmc + ours.gqa]
        variants += [(ours.vanilla, POLICIES[n](Budget(cr=c))) for n in names for c in ours.crs]
        results = evaluate(opts, "dmc compare " + shlex.join(argv), variants)
    except TaskError as err:
        sys.exit(f"dmc compare: error: {err}")
    print((Path(opts.out) / "report.md").read_text())
    print(f"wrote {Path(opts.out) / 'results.json'}, report.md and {len(results['plots'])} plots")
