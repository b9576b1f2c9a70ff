"""``dmc compare``: the vanilla model, DMC and DMS checkpoints and every training-free policy at matched
compression, on the same tasks, in one table and one quality-versus-CR (Pareto) plot per task.

    dmc compare VANILLA_DIR --control CONTROL_DIR --dmc DMC_DIR [...] --dms DMS_DIR [...] --gqa GQA_DIR [...] \
        --policies all \
        --crs 2 4 8 --tasks ppl ppl_prose needle --out DIR [--kv-bits 16 8 4 --policy-kv-bits 4]

Every policy runs on the vanilla model and on each LM-only control: the control was fine-tuned on the same
data as the DMC model, so "policy on the control" is the comparison that leaves fine-tuning out of the gap.

Every other option is ``dmc eval``'s (task sizes, batch size, device...). Finished items are cached
under DIR/items, so rerunning continues an interrupted comparison.

    dmc compare --protocol compare-135m [--assemble] [--out DIR] [--jobs N]

runs a whole protocol (``eval/protocol.py``; ``make compare``) as a resumable chain of units: the trainings it
needs (in the run cache, ``$DMC_RUN_CACHE``), each evaluated variant, and a report with paired statistics
assembled from the committed items alone. ``--assemble``: only rebuild the report from the items, saying which
units are missing. ``--jobs N``: N evaluations at once, each a process with its share of ``--threads``.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .run import Variant, check_kv_bits, evaluate
from .run import parser as eval_parser
from .tasks import TaskError


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="dmc compare", description=__doc__, add_help=True,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("vanilla", nargs="?", help="the vanilla Llama folder (also the base of every policy)")
    ap.add_argument("--protocol", default=None, help="run a whole protocol instead (compare-135m, curve-135m, or a JSON file): "
                    "trains what is missing into the run cache, evaluates what is missing, assembles the report")
    ap.add_argument("--assemble", action="store_true", help="with --protocol: only assemble the report from its "
                    "items (no model needed)")
    ap.add_argument("--out", default=None, help="output folder (rerun the same command to resume); with --protocol, "
                    "default: the protocol's own")
    ap.add_argument("--jobs", type=int, default=1, help="with --protocol: evaluations at once, each a process with "
                    "its share of --threads")
    ap.add_argument("--dmc", nargs="*", default=[], help="exported DMC folders")
    ap.add_argument("--dms", nargs="*", default=[], help="exported DMS folders (dmc train with model.method: dms, "
                    "then dmc export)")
    ap.add_argument("--gqa", nargs="*", default=[], help="GQA baseline folders (dmc gqa-convert, then dmc train "
                    "with model.method: gqa and dmc export)")
    ap.add_argument("--control", nargs="*", default=[], help="LM-only control folders (dmc train with model.method: "
                    "control, then dmc export): compared as models, and every policy runs on them too")
    ap.add_argument("--policies", nargs="+", default=["all"], help="policy names, or 'all'")
    ap.add_argument("--crs", type=float, nargs="+", default=[2, 4, 8], help="policy budgets as CRs")
    ap.add_argument("--policy-kv-bits", type=int, nargs="+", default=None, help="cache precisions for the policies "
                    "(default: --kv-bits, which sets them for every model)")
    if any(a == "--protocol" or a.startswith("--protocol=") for a in argv):
        # no model folders: everything that is not ours is dmc eval's (an optional positional would swallow the
        # value of `--threads 2`)
        protocol_ap = argparse.ArgumentParser(prog="dmc compare")
        for flag in ("--protocol", "--out"):
            protocol_ap.add_argument(flag, default=None)
        protocol_ap.add_argument("--assemble", action="store_true")
        protocol_ap.add_argument("--jobs", type=int, default=1)
        ours, rest = protocol_ap.parse_known_args(argv)
        return run_protocol(ours, rest)
    ours, rest = ap.parse_known_args(argv)
    rest += ["--out", ours.out] if ours.out else []
    if ours.jobs != 1:
        sys.exit("dmc compare: error: --jobs runs a protocol's evaluations at once; use it with --protocol NAME")
    if ours.vanilla is None:
        sys.exit("dmc compare: error: give the vanilla model's folder (and --dmc/--control/--gqa folders), or "
                 "--protocol NAME")
    from .policies import POLICIES, Budget

    names = sorted(POLICIES) if ours.policies == ["all"] else ours.policies
    unknown = [n for n in names if n not in POLICIES]
    bad_cr = [c for c in ours.crs if c < 1]
    opts = eval_parser().parse_args([ours.vanilla, *ours.control, *ours.dmc, *ours.dms, *ours.gqa, *rest])
    try:
        check_roles(ours)
        if unknown:
            raise TaskError(f"unknown policy {unknown[0]!r}; choose from {', '.join(sorted(POLICIES))} or 'all'")
        if bad_cr:
            raise TaskError(f"--crs {bad_cr[0]:g}: every CR must be >= 1")
        bits = check_kv_bits(opts.kv_bits)
        policy_bits = check_kv_bits(ours.policy_kv_bits, "--policy-kv-bits") if ours.policy_kv_bits else bits
        models = [(ours.vanilla, "vanilla")] + [(c, "control") for c in ours.control]
        models += [(d, "dmc") for d in ours.dmc] + [(d, "dms") for d in ours.dms] + [(g, "gqa") for g in ours.gqa]
        variants = [Variant(path, None, role, b) for path, role in models for b in bits]
        for base, role in [(ours.vanilla, "vanilla")] + [(c, "control") for c in ours.control]:
            variants += [Variant(base, POLICIES[n](Budget(cr=c)), role, b)
                         for n in names for c in ours.crs for b in policy_bits]
        results = evaluate(opts, "dmc compare " + shlex.join(argv), variants)
    except TaskError as err:
        sys.exit(f"dmc compare: error: {err}")
    print((Path(opts.out) / "report.md").read_text())
    print(f"wrote {Path(opts.out) / 'results.json'}, report.md and {len(results['plots'])} plots")


# what each folder option holds: its model type, and the option for each other type
ROLE_TYPES = {"vanilla": "llama", "control": "llama", "gqa": "llama", "dmc": "dmc_llama", "dms": "dms_llama"}
TYPE_OPTION = {"dmc_llama": "--dmc", "dms_llama": "--dms", "llama": "--control or --gqa (or the vanilla position)"}


def check_roles(ours: argparse.Namespace) -> None:
    """Each folder under the option that names its kind: a DMS folder given to --dmc (and so on) is one line."""
    from dmc.hub import ModelSourceError, model_config

    for role, want in ROLE_TYPES.items():
        paths = [ours.vanilla] if role == "vanilla" else getattr(ours, role)
        for path in paths:
            try:
                got = model_config(path).model_type
            except ModelSourceError:
                continue  # dmc eval names a missing folder itself
            if got != want:
                where = "the vanilla model" if role == "vanilla" else f"--{role}"
                raise TaskError(f"{path} is a {got!r} model, given as {where}, which takes {want!r} folders; pass it "
                                f"with {TYPE_OPTION.get(got, 'the option for its kind')}")


def run_protocol(ours: argparse.Namespace, rest: list[str]) -> None:
    from . import protocol

    try:
        spec = protocol.load_protocol(ours.protocol)
        out = ours.out or spec.out
        if not out:
            raise TaskError(f"--protocol {ours.protocol}: give --out DIR (the protocol names none)")
        if ours.jobs < 1:
            raise TaskError(f"--jobs {ours.jobs}: give 1 or more (evaluations run at once, each with its share of --threads)")
        results = protocol.run(spec, out, rest, assemble_only=ours.assemble, jobs=ours.jobs)
    except TaskError as err:
        sys.exit(f"dmc compare: error: {err}")
    print((Path(out) / "report.md").read_text())
    missing = len(results["missing"])
    print(f"wrote {Path(out) / 'results.json'}, report.md and {len(results['plots'])} plots"
          + (f"; {missing} unit(s) not complete" if missing else ""))
