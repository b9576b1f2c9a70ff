"""``dmc train --config configs/X.yaml [--section.key=value ...] [--resume auto|none|PATH]``."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import yaml

from dmc.config import DMCConfig
from dmc.metrics import LLAMA_TYPES

from .recipe import Recipe, RunSection
from .recipes import RecipeNotFound, resolve


class RecipeError(ValueError):
    pass


def _check_keys(data, cls, where: str = "") -> None:
    """Refuse unknown YAML keys, listing the valid ones (jsonargparse alone does not list them)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            raise RecipeError(f"unknown key {where + key!r}; valid keys{' in ' + where.rstrip('.') if where else ''}: "
                              f"{', '.join(fields)}")
        sub = fields[key].default_factory if fields[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub) and value is not None:
            _check_keys(value, sub, f"{where}{key}.")


def load_recipe_file(path: str | Path) -> dict:
    data = yaml.safe_load(Path(path).read_text()) or {}
    _check_keys(data, Recipe)
    return data


def _resolve_configs(argv: list[str]) -> list[str]:
    """argv with every ``--config`` value a checked file: a path, or a packaged recipe's name (`dmc recipes`)."""
    out = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            out[i + 1] = str(_checked(argv[i + 1]))
        elif arg.startswith("--config="):
            out[i] = f"--config={_checked(arg.split('=', 1)[1])}"
    return out


def _checked(config: str) -> Path:
    try:
        path = resolve(config)
    except RecipeNotFound as err:
        raise RecipeError(str(err)) from None
    load_recipe_file(path)
    return path


def parser():
    """`dmc train`'s parser: the run options and every recipe field as --section.key, described by the
    ``Args:`` of its section's docstring (train/recipe.py)."""
    from jsonargparse import ActionConfigFile, ActionYesNo, ArgumentParser

    ap = ArgumentParser(prog="dmc train", description="Continued pretraining of a Llama model with DMC",
                        exit_on_error=False)
    ap.add_argument("--config", action=ActionConfigFile, help="a recipe: a packaged one's name (`dmc recipes` lists them) or a YAML file")
    ap.add_argument("--resume", default="auto", help="auto (latest checkpoint in run.out_dir), none, or a path")
    ap.add_argument("--stop_at", type=int, default=None, help="stop after this many steps (schedule unchanged)")
    ap.add_argument("--trust-checkpoint", action=ActionYesNo, default=False, help="resume from a checkpoint holding "
                    "pickled objects beyond tensors and plain containers (they can run code: trusted sources only)")
    ap.add_argument("--scale", type=int, default=1, help="every stage of the schedule (stage 1, ramp, hold, "
                    "transfer) times this: a point of a tokens curve")
    ap.add_argument("--plan", action=ActionYesNo, default=False, help="print the resolved recipe, its steps and tokens "
                    "as JSON and exit without training; with --run.out_dir, refuse a folder holding another recipe's run")
    for f in dataclasses.fields(Recipe):
        ap.add_class_arguments(f.default_factory, nested_key=f.name)
    return ap


def parse_options(argv: list[str]) -> tuple[Recipe, dict]:
    """The resolved recipe (scaled by --scale) and the run options (resume, stop_at, trust_checkpoint, plan)."""
    argv = _resolve_configs(argv)
    try:
        cfg = parser().parse_args(argv)
    except Exception as err:  # jsonargparse's ArgumentError: type errors, unknown --keys
        raise RecipeError(str(err).strip().splitlines()[0]) from err
    d = cfg.as_dict()
    try:
        recipe = Recipe(**{f.name: f.default_factory(**d[f.name]) for f in dataclasses.fields(Recipe)})
        recipe = recipe.scaled(d["scale"]) if d["scale"] != 1 else recipe
        recipe.validate()
    except ValueError as err:
        raise RecipeError(str(err)) from err
    return recipe, {k: d[k] for k in ("resume", "stop_at", "trust_checkpoint", "plan")}


def parse(argv: list[str]) -> tuple[Recipe, str, int | None, bool]:
    """The recipe and run options of a command that trains (``dmc demo``, ``dmc rehearse``): ``--plan`` is
    ``dmc train``'s alone, refused here rather than ignored (the command would train)."""
    recipe, o = parse_options(argv)
    if o["plan"]:
        raise RecipeError("--plan prints a recipe without training and is dmc train's option: run dmc train --config "
                          "... --plan")
    return recipe, o["resume"], o["stop_at"], bool(o["trust_checkpoint"])


def plan(recipe: Recipe, check_folder: bool = False) -> dict:
    """What ``dmc train`` would run: the resolved recipe, its steps and the tokens one process reads. With
    ``check_folder`` (``--run.out_dir`` named), a folder already holding a run of another recipe is refused, even
    without a checkpoint in it (stricter than a fresh run, which starts such a folder over)."""
    if check_folder:
        _check_same_recipe(recipe, Path(recipe.run.out_dir))
    return {"recipe": recipe.to_dict(), "steps": recipe.total_steps, "tokens": recipe.tokens}


def run(recipe: Recipe, resume: str = "auto", stop_at: int | None = None, trust_checkpoint: bool = False) -> dict:
    import lightning as L
    import torch

    from .callbacks import AtomicCheckpoint, Plots, Telemetry, Validation, atomic_write_text, last_jsonl
    from .data_module import BlocksDataModule
    from .loggers import build_loggers, checkpoint_step
    from .module import DMCTrainingModule
    from .progress import StepProgress
    from .strategy import build_strategy, check_devices, check_kernels

    r = recipe.run
    check_devices(r)
    check_kernels(recipe.model, r)
    if r.threads:
        torch.set_num_threads(r.threads)
    # Values below ~1e-38 become 0 on the CPU: a softmax over strongly biased scores (DMS's log(1 - alpha) of
    # confident gates, DMC's of confident merges) otherwise fills with subnormal numbers, which x86 handles
    # ~4x slower in attention's forward and backward (measured: 172 -> 45 ms per call at T = 512).
    torch.set_flush_denormal(True)
    out = Path(r.out_dir)
    ckpt = None if resume == "none" else (AtomicCheckpoint.latest(r.out_dir) if resume == "auto" else resume)
    if recipe.model.method in ("dmc", "dms") and ckpt is None:  # before the run folder exists: a refusal leaves nothing
        _check_source(recipe)
    out.mkdir(parents=True, exist_ok=True)
    if ckpt is not None and not Path(ckpt).exists():
        raise RecipeError(f"--resume {ckpt!r} does not exist")
    if ckpt is None:
        _check_fresh_start(recipe)
    else:
        _check_resume_compatible(recipe, ckpt, trust_checkpoint)
        _check_same_recipe(recipe, out)
    if recipe.model.method == "gqa":
        _check_gqa(recipe)
    if recipe.distill.enabled or recipe.schedule.transfer_steps:
        from .teacher import check_teacher

        check_teacher(recipe)
    resume_step, first = checkpoint_step(ckpt), launch_rank() == 0
    if first:
        _prepare_run_folder(recipe, out, resume_step)
    last_step = min(stop_at or recipe.total_steps, recipe.total_steps)
    callbacks = [AtomicCheckpoint(r.out_dir, r.checkpoint_every, r.keep_last), Telemetry(r.out_dir, r.log_every),
                 Plots(r.out_dir)]
    if recipe.data.validation_blocks:
        callbacks.insert(0, Validation(r.out_dir, r.validate_every, last_step, recipe.data.batch_size))
    if r.progress_bar:
        callbacks.append(StepProgress(last_step, recipe.schedule.stage1_steps, recipe.schedule.ramp_steps,
                                       recipe.schedule.transfer_steps))
    deepspeed = r.strategy.startswith("deepspeed")
    trainer = L.Trainer(
        max_steps=last_step, max_epochs=-1,
        accelerator=r.accelerator, devices=r.devices, num_nodes=r.num_nodes,
        strategy=build_strategy(r.strategy, r.accelerator, r.deepspeed_config, recipe.optim.grad_clip),
        precision=r.precision,
        logger=build_loggers(r, out, resume_step, first), callbacks=callbacks, enable_checkpointing=False,
        log_every_n_steps=r.log_every, gradient_clip_val=None if deepspeed else recipe.optim.grad_clip,
        accumulate_grad_batches=recipe.optim.accumulate_grad_batches, enable_progress_bar=False,
        num_sanity_val_steps=0, limit_val_batches=0, enable_model_summary=False,
    )
    L.seed_everything(r.seed, workers=True, verbose=False)
    module = DMCTrainingModule(recipe)
    data = BlocksDataModule(recipe.data, recipe.model.path, seed=r.seed)
    from . import safe_load

    with safe_load.allowed():  # Lightning's own torch.load of the checkpoint, under the same rule
        trainer.fit(module, datamodule=data, ckpt_path=ckpt, weights_only=not trust_checkpoint)
    summary = {"steps": trainer.global_step, "checkpoint": AtomicCheckpoint.latest(r.out_dir), "data": dict(data.stats)}
    validation = last_jsonl(out / "validation.jsonl")
    if validation:
        summary["validation"] = validation
    if trainer.is_global_zero:
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


def launch_rank() -> int:
    """This process's global rank before Lightning sets up: torchrun's RANK, or (Lightning's own launcher)
    LOCAL_RANK and NODE_RANK, both 0 only on the first process."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    return int(os.environ.get("LOCAL_RANK", 0)) + int(os.environ.get("NODE_RANK", 0))


def _prepare_run_folder(recipe: Recipe, out: Path, resume_step: int) -> None:
    """The resolved recipe in RUN/config.yaml; what a killed run wrote after its last checkpoint goes (the steps
    that redo it write it again), and so does a checkpoint it was writing. A fresh start in a folder with an earlier
    run's checkpoints moves them aside to ``ckpt.replaced-N`` (kept, not deleted): left in ``ckpt/`` they would
    outrank and prune every new checkpoint of a shorter run."""
    from .callbacks import atomic_write_text, truncate_jsonl

    if resume_step == 0 and any((out / "ckpt").glob("step-*.ckpt")):
        aside = next(out / f"ckpt.replaced-{n}" for n in range(1, 10_000) if not (out / f"ckpt.replaced-{n}").exists())
        (out / "ckpt").rename(aside)
        print(f"dmc train: starting {out} over; the earlier run's checkpoints moved to {aside}", flush=True)
    resolved = recipe.to_dict()
    header = f"# The resolved recipe of this run. Run again: dmc train --config {out}/config.yaml\n"
    atomic_write_text(out / "config.yaml", header + yaml.safe_dump(resolved, sort_keys=False))
    for name in ("telemetry.jsonl", "validation.jsonl"):
        truncate_jsonl(out / name, resume_step)
    for stale in (out / "ckpt").glob("*.tmp"):
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()


def _check_fresh_start(recipe: Recipe) -> None:
    from dmc.hub import model_config

    path = recipe.model.path
    model_type = model_config(path, "model.path").model_type  # a local folder or a Hub id
    if model_type not in LLAMA_TYPES:
        raise RecipeError(f"model.path={path!r} is a {model_type!r} model; DMC needs a Llama-architecture model")
    if recipe.model.method == "control" and model_type != "llama":
        raise RecipeError(f"model.method=control trains the vanilla model; model.path={path!r} is a {model_type!r} "
                          "model: point it at the source Llama the DMC run started from")


def _check_source(recipe: Recipe) -> None:
    """A dmc_llama or dms_llama folder continues with its own gate (it loads with its own config: a recipe asking for
    the other gate would silently train the folder's). DMS's channel gate: its stage 1 depends on the source."""
    from dmc.hub import model_config

    m, method = recipe.model, recipe.model.method
    source = model_config(m.path, "model.path")
    gate = getattr(source, f"{method}_gate", "channel")
    if source.model_type == f"{method}_llama" and gate != getattr(m, method).gate:
        raise RecipeError(f"model.path={m.path!r} is a {method.upper()} model with the {gate} gate; continue it with "
                          f"model.{method}.gate: {gate}")
    if method == "dms" and m.dms.gate == "channel":
        _check_channel_stage1(recipe, continued=source.model_type == "dms_llama")


def _check_channel_stage1(recipe: Recipe, continued: bool) -> None:
    """A Llama's channel still serves attention (fade it out first); a DMS folder's channel already decides (a stage 1
    would zero the trained rows)."""
    m, stage1 = recipe.model, recipe.schedule.stage1_steps
    if continued and stage1:
        raise RecipeError(f"model.path={m.path!r} already decides from its channel; set schedule.stage1_steps: 0 to "
                          "continue it (a stage 1 would zero the trained decision rows)")
    if not continued and not stage1:
        raise RecipeError("model.dms.gate=channel repurposes a query channel that attention reads until stage 1 fades "
                          "it out: set schedule.stage1_steps > 0 (e.g. 100)")


def _check_gqa(recipe: Recipe) -> None:
    """The pooled head count must fit the model before any step runs."""
    from transformers import AutoConfig

    from .module import gqa_kv_heads

    try:
        gqa_kv_heads(recipe, AutoConfig.from_pretrained(recipe.model.path))
    except ValueError as err:
        raise RecipeError(str(err)) from None


# Settings a resume may change: how the run is executed, and the exported model's inference-only fields.
RESUME_MAY_CHANGE = {"data.num_workers", "model.dmc.decode_backend", "model.dmc.block_size",
                     "model.dms.decode_backend", "model.dms.block_size"} | {
    f"run.{f.name}" for f in dataclasses.fields(RunSection) if f.name not in ("seed", "precision")}
# The DMC fields a recipe recorded before model.dmc existed held flat under model: read as model.dmc.*.
LEGACY_DMC_FIELDS = {f.name for f in dataclasses.fields(DMCConfig)} - {"enabled", "target_cr"}


def flat_settings(recipe: dict) -> dict:
    """'section.key' -> value of a resolved recipe (``Recipe.to_dict()`` or a recorded config.yaml), a nested
    method section (model.dmc, model.dms) as 'model.dmc.key'."""
    out = {}
    for section, values in recipe.items():
        for key, value in (values or {}).items():
            key = f"dmc.{key}" if section == "model" and key in LEGACY_DMC_FIELDS else key
            if isinstance(value, dict):
                out.update({f"{section}.{key}.{sub}": v for sub, v in value.items()})
            else:
                out[f"{section}.{key}"] = value
    return out


def recipe_changes(old: dict, new: dict) -> list[str]:
    """'section.key: old -> new' for every computation-relevant setting that differs between two resolved
    recipes (``Recipe.to_dict()``)."""
    old, new = flat_settings(old), flat_settings(new)
    return [f"{name}: {old.get(name, value)!r} -> {value!r}" for name, value in new.items()
            if name not in RESUME_MAY_CHANGE and old.get(name, value) != value]


def _check_same_recipe(recipe: Recipe, out: Path) -> None:
    """Resuming continues the recipe the run folder was started with; resuming it under a changed one would
    give curves and a checkpoint that neither recipe produces."""
    recorded = out / "config.yaml"
    if not recorded.exists():
        return
    changes = recipe_changes(yaml.safe_load(recorded.read_text()) or {}, recipe.to_dict())
    if changes:
        more = f" (and {len(changes) - 2} more)" if len(changes) > 2 else ""
        raise RecipeError(f"{out} holds a run of another recipe ({'; '.join(changes[:2])}{more}); use a new "
                          "--run.out_dir, or --resume none to start this folder over (its checkpoints are kept aside)")


def _check_resume_compatible(recipe: Recipe, ckpt: str, trust: bool = False) -> None:
    """A checkpoint that would run code when loaded, or of another model (different shapes), is refused
    before Lightning loads it."""
    from transformers import AutoConfig

    from . import safe_load

    p = Path(ckpt)
    try:
        if p.is_dir():  # DeepSpeed directory: every shard checked; shapes are checked by the engine itself
            safe_load.check(p, trust)
            return
        state = safe_load.load(p, trust, mmap=True)  # the check and the read in one
    except safe_load.UntrustedCheckpoint as err:
        raise RecipeError(str(err)) from None
    config = AutoConfig.from_pretrained(recipe.model.path)
    emb = state["state_dict"].get("model.model.embed_tokens.weight")
    if emb is not None and tuple(emb.shape) != (config.vocab_size, config.hidden_size):
        raise RecipeError(
            f"checkpoint {ckpt} is from another model (embeddings {tuple(emb.shape)}, model.path has "
            f"{(config.vocab_size, config.hidden_size)}); use --resume none or the matching model.path"
        )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        recipe, o = parse_options(argv)
        if o["plan"]:  # the folder is checked only where named: a recipe's default folder may hold another length
            named = any(a == "--run.out_dir" or a.startswith("--run.out_dir=") for a in argv)
            print(json.dumps(plan(recipe, check_folder=named), indent=2))
            return
        summary = run(recipe, o["resume"], o["stop_at"], bool(o["trust_checkpoint"]))
    except (RecipeError, ValueError, FileNotFoundError) as err:  # data.DataError is a ValueError too
        sys.exit(f"dmc train: error: {err}")
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2))
