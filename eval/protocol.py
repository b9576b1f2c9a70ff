"""A comparison protocol as a resumable chain of units: ``dmc compare --protocol compare-135m`` (``make compare``).

A protocol names a base model, the trainings it needs (each a recipe: the LM-only control, DMC at 2x and 4x,
GQA), the eviction policies and CRs to run on the base and on the control, and the evaluation settings. Each
evaluated variant (a model, or a base model under a policy at a CR) is a unit of evaluation; each training a unit
of training. A run does only what is missing:

- a variant whose items (``OUT/items``, committed) are complete for its unit's current recipe, and whose model
  folder is absent or unchanged on disk, is done: nothing is loaded;
- a variant that is not needs its model folder: the base, or a training's export in the run cache
  (``dmc.run_cache``), trained there first (``dmc train``, resumable) and exported when missing; a folder whose
  weights changed (retrained, not reproduced) answers to another fingerprint, so its items are computed afresh and
  the stale ones removed;
- the report (``results.json``, ``report.md``, plots; ``eval/assemble.py``) is assembled from the items alone.

A retrain is deterministic on the same kind of machine; the fingerprint in the report says whether it reproduced.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .tasks import TaskError

TASKS = ("ppl", "ppl_prose", "needle")  # the tasks whose results assemble from items alone


@dataclass(frozen=True)
class Training:
    """A model the protocol trains: ``recipe`` (a packaged recipe's name or a YAML path) trained from the
    protocol's base and exported as ``export`` (the model's name in the report)."""

    key: str
    recipe: str
    export: str
    role: str  # "control", "dmc", "dms" or "gqa"
    cr: float | None = None  # the policy CR its paired comparisons use (None: not a compressor)
    scale: int = 1  # every stage of the recipe's schedule times this: a point of a tokens curve (eval/curve.py)
    control: str | None = None  # the key of its own control (trained at the same tokens); None: the protocol's


@dataclass(frozen=True)
class Protocol:
    name: str
    base: str  # the vanilla model's folder
    trainings: tuple[Training, ...] = ()
    policies: tuple[str, ...] = ()
    crs: tuple[float, ...] = ()
    policy_bases: tuple[str, ...] = ("vanilla",)  # "vanilla" and training keys every policy runs on
    eval_args: tuple[str, ...] = field(default_factory=tuple)  # ``dmc eval`` options
    out: str = ""
    kind: str = "compare"  # "curve": the report is each model's perplexity over its control's against tokens
    cache: str = ""  # the run cache's folder for its trainings (default: the name); a curve shares the comparison's

    def training(self, key: str) -> Training:
        return next(t for t in self.trainings if t.key == key)


# The README's comparison on SmolLM2-135M: the base, its LM-only control, DMC and DMS at 2x and 4x, GQA at 3x, every
# policy at 2/4/8x on the base and on the control; code and English-prose perplexity on 32 x 512-token blocks and
# needle on 24 cells in both policy settings. CPU, fp32.
COMPARE_135M = Protocol(
    name="compare-135m",
    base="checkpoints/smollm2-135m",
    trainings=(
        Training("control", "smollm2-135m-control-cpu", "smollm2-135m-control-hf", "control"),
        Training("dmc2x", "smollm2-135m-cpu", "smollm2-135m-dmc2x-hf", "dmc", 2),
        Training("dmc4x", "smollm2-135m-4x-cpu", "smollm2-135m-dmc4x-hf", "dmc", 4),
        Training("gqa3x", "smollm2-135m-gqa-cpu", "smollm2-135m-gqa3x-hf", "gqa", 2),  # 3x: the policies' 2x is the nearer below
        Training("dms2x", "smollm2-135m-dms2x-cpu", "smollm2-135m-dms2x-hf", "dms", 2),
        Training("dms4x", "smollm2-135m-dms4x-cpu", "smollm2-135m-dms4x-hf", "dms", 4),
    ),
    policies=("h2o", "scissorhands", "snapkv", "streaming_llm", "tova"),
    crs=(2, 4, 8),
    policy_bases=("vanilla", "control"),
    # batches of 24 rows: measured fastest for the sweep (16-24 rows; 48: 1.2x slower); a needle length's 8 cells x 3 CRs
    eval_args=("--tasks", "ppl", "ppl_prose", "needle", "--ppl-blocks", "32", "--ppl-block", "512",
               "--needle-contexts", "256", "512", "1024", "--needle-depths", "0.1", "0.2", "0.3", "0.4", "0.5", "0.6",
               "0.7", "0.8", "--batch-size", "24", "--device", "cpu", "--dtype", "float32"),
    out="eval/results/compare-135m",
)


def _curve_trainings(control: tuple[str, str, str], methods: list[tuple[str, str, str, str]], scales=(1, 2, 4, 8)):
    """Per scale, shortest first (an interrupted run leaves whole pairs): the control (key, recipe, export) and each
    method (key, recipe, export, role) paired with it; ``key`` at 1x (the comparison's own run), ``key-x{k}`` above."""
    name = lambda key, k: key if k == 1 else f"{key}-x{k}"  # noqa: E731
    out = []
    for k in scales:
        out.append(Training(name(control[0], k), control[1], name(control[2], k), "control", scale=k))
        out += [Training(name(key, k), recipe, name(export, k), role, scale=k, control=name(control[0], k))
                for key, recipe, export, role in methods]
    return tuple(out)


# DMC's cost against its control as the training tokens grow: the demo recipe (the adapter gate), the channel-gate
# recipe it replaced and their LM-only control at 1, 2, 4 and 8 times the demo's tokens (87k), on the comparison's
# code and prose blocks. The control's and the demo's 1x runs are the comparison's (one run cache).
CURVE_135M = Protocol(
    name="curve-135m",
    base="checkpoints/smollm2-135m",
    trainings=_curve_trainings(("control", "smollm2-135m-control-cpu", "smollm2-135m-control-hf"),
                               [("dmc2x", "smollm2-135m-cpu", "smollm2-135m-dmc2x-hf", "dmc"),
                                ("dmc2x-channel", "smollm2-135m-channel-cpu", "smollm2-135m-dmc2x-channel-hf", "dmc")]),
    policy_bases=(),
    eval_args=("--tasks", "ppl", "ppl_prose", "--ppl-blocks", "32", "--ppl-block", "512", "--batch-size", "8",
               "--device", "cpu", "--dtype", "float32"),
    out="eval/results/curve-135m",
    kind="curve",
    cache="compare-135m",
)
PROTOCOLS = {p.name: p for p in (COMPARE_135M, CURVE_135M)}


def load_protocol(spec: str) -> Protocol:
    """A named protocol, or a JSON file with the same fields (trainings as a list of objects)."""
    if spec in PROTOCOLS:
        return PROTOCOLS[spec]
    path = Path(spec)
    if not path.is_file():
        raise TaskError(f"--protocol {spec!r} is neither a protocol ({', '.join(PROTOCOLS)}) nor a JSON file")
    try:
        raw = json.loads(path.read_text())
        trainings = tuple(Training(**t) for t in raw.pop("trainings", []))
        return Protocol(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}, trainings=trainings)
    except (ValueError, TypeError) as err:
        raise TaskError(f"--protocol {spec}: not a protocol file ({err})") from None


@dataclass(frozen=True)
class Unit:
    """One evaluated variant: ``model`` ("vanilla" or a training's key), optionally under ``policy`` at ``cr``."""

    model: str
    policy: str | None = None
    cr: float | None = None

    def folder_name(self, protocol: Protocol) -> str:
        return Path(protocol.base).name if self.model == "vanilla" else protocol.training(self.model).export

    def name(self, protocol: Protocol) -> str:
        """What ``EvalModel`` names it (folder name, then ``+policy@CRx``)."""
        return self.folder_name(protocol) + (f"+{self.policy}@{self.cr:g}x" if self.policy else "")

    def role(self, protocol: Protocol) -> str | None:
        return None if self.model == "vanilla" else protocol.training(self.model).role


def units(protocol: Protocol) -> list[Unit]:
    """Every variant, in the report's order: the models, then each policy base's policies by name and CR."""
    models = [Unit("vanilla")] + [Unit(t.key) for t in protocol.trainings]
    return models + [Unit(base, p, c) for base in protocol.policy_bases for p in protocol.policies for c in protocol.crs]


def recipe_text(recipe: str) -> str:
    path = Path(recipe)
    if not path.is_file():
        path = Path(str(resources.files("dmc.configs") / f"{recipe.removesuffix('.yaml')}.yaml"))
    if not path.is_file():
        raise TaskError(f"recipe {recipe!r} is neither a packaged recipe (`dmc recipes`) nor a file")
    return path.read_text()


def _flat_dmc_section(lines: list[str]) -> list[str]:
    """A recipe's lines with a ``model.dmc`` block written flat under ``model``, as recipes held the DMC fields
    before the section existed: the settings are the same, so the items trained before stay theirs."""
    out, section, in_dmc = [], None, False
    for line in lines:
        if not line.startswith(" "):
            section, in_dmc = line.split(":")[0], False
        elif section == "model" and line == "  dmc:":
            in_dmc = True
            continue
        elif in_dmc and not line.startswith("    "):
            in_dmc = False
        out.append(line[2:] if in_dmc else line)
    return out


def training_key(protocol: Protocol, training: Training) -> str:
    """What a training's items are valid for: its recipe's settings (comment lines aside) and the base they
    start from. Items recorded under another key came from another recipe: the unit is trained afresh."""
    lines = [ln.rstrip() for ln in recipe_text(training.recipe).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    lines = _flat_dmc_section(lines)
    # a longer schedule is another run; 1x keeps the key its items were recorded under before curves existed
    scaled = [training.scale] if training.scale != 1 else []
    digest = hashlib.sha256(json.dumps([lines, protocol.base, *scaled]).encode()).hexdigest()[:12]
    suffix = f"-x{training.scale}" if scaled else ""
    return f"{Path(training.recipe).name.removesuffix('.yaml')}{suffix}@{digest}"


def unit_key(protocol: Protocol, unit: Unit) -> str:
    return "vanilla" if unit.model == "vanilla" else training_key(protocol, protocol.training(unit.model))


def training_folders(protocol: Protocol, training: Training) -> tuple[Path, Path]:
    """(the training run's folder, its export) in the run cache, under the training's key."""
    from dmc.run_cache import run_cache

    root = run_cache() / (protocol.cache or protocol.name) / training_key(protocol, training).replace("@", "-")
    return root / "run", root / training.export


def model_folder(protocol: Protocol, unit: Unit) -> Path:
    return Path(protocol.base) if unit.model == "vanilla" else training_folders(protocol, protocol.training(unit.model))[1]


# ---- running ------------------------------------------------------------------------------------------------

def eval_options(protocol: Protocol, out: str | Path, extra: list[str] = ()):
    from .run import parser

    opts = parser().parse_args([protocol.base, *protocol.eval_args, *extra, "--out", str(out)])
    unsupported = [t for t in opts.tasks if t not in TASKS]
    if unsupported:
        raise TaskError(f"a protocol's tasks assemble from their items: {', '.join(TASKS)} (not {unsupported[0]})")
    return opts


def run(protocol: Protocol, out: str | Path, extra: list[str] = (), assemble_only: bool = False,
        log=print, jobs: int = 1) -> dict:
    """Train, evaluate and assemble what is missing; returns the assembled results. ``jobs``: evaluation groups
    run at once (``_evaluate``)."""
    from .assemble import assemble, variant_items, write
    from .fingerprint import folder_digest

    out = Path(out)
    opts = eval_options(protocol, out, extra)
    if opts.threads:
        import torch

        torch.set_num_threads(opts.threads)
    todo = []
    for unit in units(protocol):
        status, header, _ = variant_items(protocol, unit, opts, out)  # refuses items of two fingerprints in one line
        on_disk = folder_digest(model_folder(protocol, unit))
        # done: complete, and its model folder absent (the committed items stand) or the one the items recorded
        if status == "complete" and on_disk in (None, header["model"].get("folder")):
            continue
        todo.append(unit)
    if assemble_only or not todo:
        log("nothing to run: every unit's items are complete" if not todo else
            f"assembling only: {len(todo)} unit(s) not complete")
        results = assemble(protocol, opts, out)
        write(results, opts, out)
        return results
    trainings = [t for t in protocol.trainings if any(u.model == t.key for u in todo)]
    to_train = [t for t in trainings if not training_folders(protocol, t)[1].joinpath("config.json").is_file()]
    log(f"{protocol.name}: {len(todo)} of {len(units(protocol))} units to evaluate"
        + (f", {len(to_train)} to train first ({', '.join(t.key for t in to_train)})" if to_train else ""))
    if to_train:
        from dmc.run_cache import RunCacheError, writable_run_cache

        try:
            writable_run_cache()
        except RunCacheError as err:
            raise TaskError(str(err)) from None
    # what can run now runs first, then each training and its variants: an interruption leaves the most items done
    ready = [u for u in todo if (model_folder(protocol, u) / "config.json").is_file()]
    steps = [(None, ready)] + [(t, [u for u in todo if u.model == t.key]) for t in to_train]
    latest: dict = {}

    def report() -> None:  # after each model or sweep: what is done so far, the missing units named
        latest["results"] = assemble(protocol, opts, out)
        write(latest["results"], opts, out)

    for training, group in steps:  # every step has units, so the last report is the finished run's
        if training is not None:
            ensure_trained(protocol, training, opts, log)
        if group:
            _evaluate(protocol, group, opts, out, log, after=report, jobs=jobs)
    return latest["results"]


def ensure_trained(protocol: Protocol, training: Training, opts, log=print) -> Path:
    """The training's export in the run cache: trained (continuing its latest checkpoint) and exported first
    where missing. Each step is its own ``dmc`` process, as a user runs it."""
    run_dir, export = training_folders(protocol, training)
    if (export / "config.json").is_file():
        return export
    threads = ["--run.threads", str(opts.threads)] if opts.threads else []
    scale = []
    if training.scale != 1:
        from .curve import check_length_only

        check_length_only(run_dir, training.recipe, protocol.base, training.scale)
        scale = ["--scale", str(training.scale)]
    train = [sys.executable, "-m", "dmc.cli", "train", "--config", training.recipe, "--model.path", protocol.base,
             "--run.out_dir", str(run_dir), *threads, *scale]
    log(f"training {training.key} ({training.recipe}) in {run_dir}")
    began = time.perf_counter()
    _call(train, f"training {training.key}")
    # exported beside its final name and renamed: an interrupted export never looks finished
    partial = export.with_name(export.name + ".partial")
    _call([sys.executable, "-m", "dmc.cli", "export", str(run_dir), "--out", str(partial), "--dtype", "float32",
           "--overwrite"], f"exporting {training.key}")
    partial.replace(export)
    log(f"trained and exported {training.key} in {(time.perf_counter() - began) / 60:.1f} min: {export}")
    return export


def _call(command: list[str], what: str) -> None:
    done = subprocess.run(command)
    if done.returncode != 0:
        raise TaskError(f"{what} failed (exit {done.returncode}); its output is above. Rerun the same command to "
                        "continue from its last checkpoint")


def _evaluate(protocol: Protocol, todo: list[Unit], opts, out: Path, log=print, after=None, jobs: int = 1) -> None:
    """Evaluate the units in ``todo``; the CRs of one policy on one model run together (``evaluate_variants``);
    ``after()`` follows each model or sweep. ``jobs`` > 1: that many groups at once, each in its own process with
    its share of ``opts.threads`` (``workers.in_processes``); each writes only its own variants' item files."""
    from .run import progress_place, sweepable

    groups: dict[tuple, list[Unit]] = {}
    for unit in todo:  # one group per model and policy (each plain model alone)
        key = (unit.model, unit.policy) if unit.policy and sweepable(opts.tasks) else (unit,)
        groups.setdefault(key, []).append(unit)
    places, done = [], 0
    for group in groups.values():
        places.append(progress_place(done, len(group), len(todo)))
        done += len(group)
    began = time.perf_counter()

    def finished(entries: list[dict]) -> None:
        log(f"done {', '.join(e['name'] for e in entries)} ({(time.perf_counter() - began) / 60:.0f} min so far)")
        if after is not None:
            after()

    if jobs <= 1 or len(groups) == 1:
        for group, place in zip(groups.values(), places):
            finished(_evaluate_group(protocol, group, opts, out, place, log))
        return
    import torch

    from .workers import in_processes

    threads = max(1, (opts.threads or torch.get_num_threads()) // jobs)
    work = [(protocol, group, opts, out, place) for group, place in zip(groups.values(), places)]
    for entries in in_processes(_evaluate_group, work, jobs, threads):
        finished(entries)  # a worker's TaskError is raised here, in one line


def _evaluate_group(protocol: Protocol, group: list[Unit], opts, out: Path, place: str, log=print) -> list[dict]:
    """One model, or one policy's CRs on one model, evaluated into the item store (in this process or a worker)."""
    from .assemble import remove_stale
    from .policies import POLICIES, Budget
    from .run import Variant, evaluate_variants

    variants = [Variant(str(model_folder(protocol, u)), POLICIES[u.policy](Budget(cr=u.cr)) if u.policy else None,
                        u.role(protocol), 16, unit_key(protocol, u)) for u in group]
    by_name = {u.name(protocol): u for u in group}
    return evaluate_variants(
        opts, variants, out, opts.dtype or "float32", place,
        before_tasks=lambda view: remove_stale(protocol, by_name[view.name], opts, out, view.fingerprint, log))
