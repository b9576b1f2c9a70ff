"""``dmc rehearse --config CONFIG [--section.key=value ...]``: the recipe in miniature, end to end, before GPU hours.

Runs the miniature uninterrupted; runs it again and SIGKILLs one rank in the middle of stage 2; resumes it and
compares the loss curve with the uninterrupted one; exports the ZeRO checkpoint, evaluates the export
(perplexity, realised CR) and generates from it. Prints one table: each check, passed or the one-line reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .checks import CheckFailed, handover_rows, intact_after_kill, one_wandb_run, same_curve, stages_crossed, validation
from .launch import start
from .miniature import STAGES, attention_layout, publish, scale, write_tiny_model

SMOLLM2_TOKENIZER = ("checkpoints/smollm2-135m", Path(__file__).resolve().parents[2] / "checkpoints" / "smollm2-135m")


class Table:
    def __init__(self):
        self.rows: list[tuple[str, bool | None, str]] = []

    def check(self, name: str, fn, *args):
        """Run one check; a failure becomes its row (the reason in one line) and returns None."""
        try:
            result = fn(*args)
        except CheckFailed as err:
            self.rows.append((name, False, str(err)))
            return None
        except Exception as err:  # noqa: BLE001  (the table reports every failure in one line)
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self.rows.append((name, False, f"{type(err).__name__}: {first}"[:300]))
            return None
        detail = result[1] if isinstance(result, tuple) else result
        self.rows.append((name, True, str(detail)))
        return result

    def skip(self, name: str, why: str) -> None:
        self.rows.append((name, None, why))

    @property
    def passed(self) -> bool:
        return all(ok is not False for _, ok, _ in self.rows)

    def render(self) -> str:
        width = max(len(name) for name, _, _ in self.rows)
        mark = {True: "PASS", False: "FAIL", None: "skip"}
        return "\n".join(f"{name:<{width}}  {mark[ok]}  {detail}" for name, ok, detail in self.rows)


def _tokenizer(model_path: str | None, explicit: str | None):
    """The tokenizer for the tiny model: ``explicit``, else the recipe model's (when reachable), else SmolLM2's."""
    from transformers import AutoTokenizer

    tried = [explicit] if explicit else [*([model_path] if model_path else []), *map(str, SMOLLM2_TOKENIZER)]
    for source in tried:
        try:
            return AutoTokenizer.from_pretrained(source), source
        except (OSError, ValueError):
            continue
    raise CheckFailed(f"no tokenizer: tried {', '.join(tried)}; pass --tokenizer PATH (or run `make model` for "
                      "SmolLM2's)")


def _layout(ns, recipe):
    import torch

    on_gpu = torch.cuda.is_available()
    if ns.devices:
        devices = ns.devices
    elif on_gpu:
        devices = max(1, min(recipe.run.devices, torch.cuda.device_count() // ns.nodes))
    else:
        devices = 1 if recipe.run.devices * recipe.run.num_nodes == 1 else max(1, 2 // ns.nodes)
    return on_gpu, devices


class Rehearsal:
    def __init__(self, ns, recipe, root: Path):
        self.ns, self.user, self.root = ns, recipe, root
        self.on_gpu, self.devices = _layout(ns, recipe)
        self.hf_home = root / "hf_home"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("HF_HUB_CACHE", "HF_DATASETS_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE")}
        self.env.update(HF_HOME=str(self.hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="offline",
                        TOKENIZERS_PARALLELISM="false")
        self.env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.cwd() / ".cache" / "torch_extensions"))
        self.launches: dict[str, int] = {}

    # ---- setup -------------------------------------------------------------------------------------
    def prepare(self) -> str:
        from dmc.hub import looks_like_hub_id

        layout = attention_layout(self.user.model.path)
        reachable = self.user.model.path if layout[2] is not None else None  # one slow lookup is enough offline
        tokenizer, source = _tokenizer(reachable, self.ns.tokenizer)
        tiny, note = write_tiny_model(self.user, layout, tokenizer, self.root / "tiny-model")
        hub = looks_like_hub_id(self.user.model.path)
        model_path = self.user.model.path if hub else str(tiny)
        self.mini, changes = scale(self.user, self.root / "killed", model_path, self.devices, self.ns.nodes,
                                   self.on_gpu, self.ns.accumulate)
        for name in ("uninterrupted", "killed"):  # the same miniature, in two run folders
            run = dataclasses.replace(self.mini.run, out_dir=str(self.root / name))
            recipe = dataclasses.replace(self.mini, run=run)
            (self.root / f"{name}.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        self.notes = [note, f"tokenizer: {source}", *publish(self.user, tiny, self.hf_home, hub), *changes]
        m = self.mini
        return (f"{self.ns.nodes} node(s) x {self.devices} {m.run.accelerator} process(es), {m.run.strategy}, "
                f"{m.run.precision}, {m.data.kind} data, {m.total_steps} steps")

    # ---- runs ----------------------------------------------------------------------------------------
    def _start(self, name: str, extra: list[str] | None = None):
        """Launch the run folder ``name``'s recipe; each launch logs to logs/NAME-K-nodeI.log."""
        self.launches[name] = self.launches.get(name, -1) + 1
        return start(self.root / f"{name}.yaml", self.ns.nodes, self.devices, self.env, self.root / "logs",
                     f"{name}-{self.launches[name]}", extra)

    def train(self, name: str, extra: list[str] | None = None) -> str:
        t0 = time.monotonic()
        run = self._start(name, extra)
        codes = run.wait(self.ns.timeout)
        if codes != [0] * len(codes):
            raise CheckFailed(f"exit codes {codes}; log: {run.logs[0]}: {_last_error(run.tail())}")
        return f"{len(codes)} launcher(s) x {self.devices} process(es), {time.monotonic() - t0:.0f} s"

    def kill_mid_stage2(self) -> tuple[int, str]:
        """Start the second run and SIGKILL its last rank once a mid-stage-2 checkpoint is complete."""
        from dmc.train.callbacks import AtomicCheckpoint
        from dmc.train.loggers import checkpoint_step

        out = self.root / "killed"
        run = self._start("killed")
        target, rank = STAGES[0] + 2, self.devices * self.ns.nodes - 1
        deadline = time.monotonic() + self.ns.timeout
        while time.monotonic() < deadline and run.running():
            latest = AtomicCheckpoint.latest(str(out))
            if latest and checkpoint_step(latest) >= target:
                break
            time.sleep(0.05)
        if not run.running():
            raise CheckFailed(f"the run ended before the kill; log: {run.logs[0]}: {_last_error(run.tail())}")
        if not run.kill_rank(rank):
            run.stop()
            raise CheckFailed(f"found no process of rank {rank} to kill")
        codes = run.wait(120)
        step = intact_after_kill(out, self.mini.total_steps)
        if not any(codes):
            raise CheckFailed(f"after SIGKILL of rank {rank} the launchers exited {codes}")
        leftovers = [p.name for p in (out / "ckpt").glob("*.tmp")]
        return step, (f"SIGKILL to rank {rank} after checkpoint {target}: launchers exited {codes}; resumes from "
                      f"step {step} of {self.mini.total_steps}" + (f"; half-written {leftovers}" if leftovers else ""))

    def resume(self, step: int) -> str:
        detail = self.train("killed")
        stale = [p.name for p in (self.root / "killed" / "ckpt").glob("*.tmp")]
        if stale:
            raise CheckFailed(f"half-written checkpoints left behind: {stale}")
        return f"from step {step}: {detail}"

    def dmc(self, *args, name: str, timeout: int = 600) -> str:
        done = subprocess.run([sys.executable, "-m", "dmc.cli", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        (self.root / "logs" / f"{name}.log").write_text(done.stdout + done.stderr)
        if done.returncode:
            raise CheckFailed(f"`dmc {args[0]}` exited {done.returncode}: {_last_error(done.stdout + done.stderr)}")
        return done.stdout

    def export_eval_generate(self, table: Table) -> None:
        export = self.root / "export"
        ok = table.check("export (ZeRO -> HF folder)", lambda: self.dmc(
            "export", str(self.root / "killed"), "--out", str(export), "--dtype", "float32", name="export")
            .strip().splitlines()[-1])
        if ok is None:
            return table.skip("eval + generate", "needs the export")
        table.check("eval of the export", self.evaluate, export)
        table.check("generate from the export", self.generate, export)

    def generate(self, export: Path) -> str:
        out = self.dmc("generate", str(export), "--prompt", "def main():", "--max-new-tokens", "8", name="generate")
        lines = out.strip().splitlines()
        head = next((line for line in lines if line.startswith("--- prompt 0")), "")
        text = lines[lines.index(head) + 1] if head in lines and lines.index(head) + 1 < len(lines) else ""
        return f"{text[:60]!r} {head.removeprefix('--- prompt 0').strip()}"

    def evaluate(self, export: Path) -> str:
        self.dmc("eval", str(export), "--tasks", "ppl", "--ppl-blocks", "2", "--ppl-block", "64", "--out",
                 str(self.root / "eval"), name="eval")
        results = json.loads((self.root / "eval" / "results.json").read_text())
        (entry,) = results["models"].values()
        ppl = entry["tasks"]["ppl"]
        return f"perplexity {ppl['perplexity']:.4g}, realised CR {ppl['realised_cr']:.3f} on {ppl['tokens']} tokens"


def _last_error(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error:" in line]
    return (errors or lines or ["(no output)"])[-1][:240]


def rehearse(ns, recipe, root: Path) -> tuple[Table, list[str]]:
    """(the table, what the miniature changed)."""
    table = Table()
    r = Rehearsal(ns, recipe, root)
    if table.check("miniature of the recipe", r.prepare) is None:
        return table, []
    return _run_checks(ns, r, root, table), r.notes


def _run_checks(ns, r: Rehearsal, root: Path, table: Table) -> Table:
    if ns.quick:
        table.check("trainer builds and takes one step", r.train, "killed", ["--stop_at", "1"])
        return table
    if table.check("uninterrupted run (every stage)", r.train, "uninterrupted") is None:
        return table
    table.check("stage boundaries crossed", stages_crossed, root / "uninterrupted",  # adapter gates: no stage 1
                1 if r.mini.model.method == "gqa" else 3 if r.mini.schedule.stage1_steps else 2)
    table.check("validation (held-out ppl, CR)", validation, root / "uninterrupted")
    killed = table.check("SIGKILL one rank mid stage 2", r.kill_mid_stage2)
    if killed is None:
        return table
    o = r.mini.optim
    if r.mini.model.method == "dmc" and r.mini.schedule.stage1_steps:
        table.check("stage-1 -> 2 handover", handover_rows, root / "killed", STAGES[0] + 1, o.lr, o.decision_lr,
                    tuple(o.betas))
    if table.check("resume after the kill", r.resume, killed[0]) is None:
        return table
    table.check("loss curve = uninterrupted run", same_curve, root / "uninterrupted", root / "killed",
                r.mini.total_steps, 1e-4 if r.on_gpu else 1e-6)
    if "wandb" in r.mini.run.loggers:
        table.check("loggers across the resume", one_wandb_run, root / "killed")
    r.export_eval_generate(table)
    return table


def main(argv: list[str] | None = None) -> None:
    from dmc.train.run import RecipeError, parse

    ap = argparse.ArgumentParser(prog="dmc rehearse", description=__doc__,
                                 epilog="Other arguments are recipe overrides (--section.key=value), as for dmc train.")
    ap.add_argument("--config", required=True, help="the recipe to rehearse: a packaged recipe's name (`dmc recipes`) or a YAML file")
    ap.add_argument("--nodes", type=int, default=1, help="rehearse as this many nodes on this machine (torchrun + "
                    "a local c10d rendezvous)")
    ap.add_argument("--devices", type=int, default=None, help="processes per node (default: this machine's GPUs "
                    "up to the recipe's, or 2 CPU processes in all)")
    ap.add_argument("--accumulate", type=int, default=None, help="gradient accumulation (default: the recipe's, "
                    "at most 4)")
    ap.add_argument("--quick", action="store_true", help="only build the trainer and take one step")
    ap.add_argument("--tokenizer", default=None, help="tokenizer for the tiny model (default: the recipe model's, "
                    "else SmolLM2's from `make model`)")
    ap.add_argument("--out", default=None, help="keep the runs, logs and exports in this folder")
    ap.add_argument("--timeout", type=int, default=900, help="seconds each training run may take")
    ns, overrides = ap.parse_known_args(argv)
    if ns.nodes < 1 or (ns.devices is not None and ns.devices < 1):
        sys.exit("dmc rehearse: error: --nodes and --devices must be >= 1")
    try:
        recipe = parse(["--config", ns.config, *overrides])[0]
    except (RecipeError, ValueError) as err:
        sys.exit(f"dmc rehearse: error: {err}")
    root = Path(ns.out) if ns.out else Path(tempfile.mkdtemp(prefix="dmc-rehearse-"))
    if ns.out and root.exists() and any(root.iterdir()):
        sys.exit(f"dmc rehearse: error: --out {root} is not empty; pass an empty or new folder")
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        table, notes = rehearse(ns, recipe, root)
    finally:
        if not ns.out:
            shutil.rmtree(root, ignore_errors=True)
    print(f"dmc rehearse {ns.config} ({'quick' if ns.quick else 'full'}, {time.monotonic() - t0:.0f} s)")
    print("".join(f"  - {note}\n" for note in notes) + table.render())
    if ns.out:
        (root / "rehearsal.json").write_text(json.dumps([dict(zip(("check", "passed", "detail"), row))
                                                         for row in table.rows], indent=2))
    sys.exit(0 if table.passed else 1)
