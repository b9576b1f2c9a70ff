"""Write a DMC model as a self-contained HF folder.

The folder holds safetensors weights, ``config.json`` (``model_type: dmc_llama``, the ``dmc_*`` fields and
an ``auto_map``), the tokenizer, a generation config, a model card, and the modeling code itself: our
modules bundled into ``configuration_dmc_llama.py`` and ``modeling_dmc_llama.py``, so that
``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works with only transformers installed.
The folder is built under a temporary name next to ``out`` and renamed into place when complete.
"""

from __future__ import annotations

import ast
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

PACKAGE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bundle:
    """What an exported folder of one method carries: its config module (bundled alone), its modeling entry (the
    bundle is it and every module it reaches by relative imports) and the class names the auto_map points to."""

    config_module: str
    modeling_entry: str
    title: str
    prefix: str  # "DMC", "DMS": the classes are {prefix}LlamaConfig, {prefix}LlamaModel, {prefix}LlamaForCausalLM

    def auto_map(self, model_type: str) -> dict[str, str]:
        return {"AutoConfig": f"configuration_{model_type}.{self.prefix}LlamaConfig",
                "AutoModel": f"modeling_{model_type}.{self.prefix}LlamaModel",
                "AutoModelForCausalLM": f"modeling_{model_type}.{self.prefix}LlamaForCausalLM"}


BUNDLES = {
    "dmc_llama": Bundle("config.py", "modeling.py", "DMC Llama", "DMC"),
    "dms_llama": Bundle("dms_config.py", "dms_modeling.py", "DMS Llama", "DMS"),
}


class ExportError(ValueError):
    """The export cannot be done as asked; the message says what to change."""


def _is_registration(node: ast.stmt) -> bool:
    # `AutoX.register(...)` at module level: the exported folder uses auto_map instead, and registering
    # from remote code would overwrite the classes of an installed dmc package.
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "register")


def bundle(modules: list[str], header: str) -> str:
    """Concatenate package modules into one source file: drop relative imports, registrations and the
    per-module ``from __future__`` lines; refuse two modules defining the same top-level name."""
    body, defined = [], {}
    for rel in modules:
        source = (PACKAGE / rel).read_text()
        tree = ast.parse(source)
        lines = source.splitlines()
        drop = set()
        for node in tree.body:
            relative = isinstance(node, ast.ImportFrom) and node.level > 0
            future = isinstance(node, ast.ImportFrom) and node.module == "__future__"
            docstring = node is tree.body[0] and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            if relative or future or docstring or _is_registration(node):
                drop.update(range(node.lineno - 1, node.end_lineno))
            for name in _top_level_names(node):
                if name in defined and defined[name] != rel:
                    raise ExportError(f"cannot bundle the modeling code: {name!r} is defined in both "
                                      f"{defined[name]} and {rel}; rename one of them")
                defined[name] = rel
        kept = "\n".join(line for i, line in enumerate(lines) if i not in drop).strip("\n")
        body.append(f"# ---- dmc/{rel} " + "-" * max(0, 90 - len(rel)) + "\n" + kept)
    return f'"""{header}"""\n\nfrom __future__ import annotations\n\n' + "\n\n\n".join(body) + "\n"


def _relative_imports(rel: str) -> list[str]:
    """The package modules (paths under dmc/) that module ``rel`` imports relatively, in source order. Only
    module-level ones: the bundler drops those lines, so a relative import inside a function would break the
    bundled copy and is refused."""
    tree = ast.parse((PACKAGE / rel).read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ImportFrom) and node.level):
            continue
        if id(node) not in top:
            raise ExportError(f"dmc/{rel}:{node.lineno} has a relative import inside a function; the export "
                              "bundles module-level relative imports only: move it to the top or import absolutely")
        base = Path(rel).parent
        for _ in range(node.level - 1):
            base = base.parent
        targets = [node.module] if node.module else [a.name for a in node.names]
        for target in targets:
            path = (base / target.replace(".", "/")).with_suffix(".py")
            if not (PACKAGE / path).exists():
                raise ExportError(f"dmc/{rel} imports {'.' * node.level}{target}, which is not a module file")
            found.append(path.as_posix())
    return found


def modeling_modules(model_type: str = "dmc_llama") -> list[str]:
    """The modeling bundle's modules in dependency order (each after everything it imports), derived from the
    imports of the method's modeling entry; configuration modules go into their own file."""
    order: list[str] = []
    configs = {b.config_module for b in BUNDLES.values()}

    def visit(rel: str, path: tuple[str, ...]) -> None:
        if rel in order or rel in configs:
            return
        if rel in path:
            raise ExportError(f"cannot bundle the modeling code: an import cycle {' -> '.join((*path, rel))}")
        for dep in _relative_imports(rel):
            visit(dep, (*path, rel))
        order.append(rel)

    visit(BUNDLES[model_type].modeling_entry, ())
    return order


def _top_level_names(node: ast.stmt) -> list[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.Assign):
        return [t.id for t in node.targets if isinstance(t, ast.Name)]
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return [node.target.id]
    return []


def code_files(model_type: str = "dmc_llama") -> dict[str, str]:
    """The two remote-code files of an exported folder of ``model_type``, built from this package's own sources."""
    from . import __version__

    b = BUNDLES[model_type]
    note = f"Bundled from the dmc package {__version__} by `dmc export`; edit the package, not this file."
    config = bundle([b.config_module], f"{b.title} configuration. {note}")
    modeling = bundle(modeling_modules(model_type), f"{b.title} modeling code. {note}")
    imports = f"from .configuration_{model_type} import {b.prefix}LlamaConfig\n"
    modeling = modeling.replace("from __future__ import annotations\n",
                                f"from __future__ import annotations\n\n{imports}", 1)
    return {f"configuration_{model_type}.py": config, f"modeling_{model_type}.py": modeling}


def _prepare_out(out: Path, overwrite: bool) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise ExportError(f"{out} exists and is not empty; choose another --out or pass --overwrite")
    tmp = out.with_name(f".{out.name}.exporting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def write_folder(model, out: str | Path, tokenizer_source: str | Path | None = None, *, dtype: str = "bfloat16",
                 overwrite: bool = False, finish=None) -> Path:
    """Write ``model`` as a HF folder at ``out``: safetensors weights in ``dtype``, config, tokenizer and
    generation config, then ``finish(tmp_folder)`` for anything else. The folder is built under a
    temporary name and renamed into place when complete, so ``out`` is never half-written."""
    from transformers import AutoTokenizer, GenerationConfig

    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ExportError(f"--dtype {dtype!r} is not a torch dtype; use bfloat16, float16 or float32")
    out = Path(out)
    tmp = _prepare_out(out, overwrite)
    try:
        target = getattr(torch, dtype)
        state = {k: v.to(target) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        config = json.loads((tmp / "config.json").read_text())
        config["dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer_source is not None:
            AutoTokenizer.from_pretrained(tokenizer_source).save_pretrained(tmp)
            try:
                GenerationConfig.from_pretrained(tokenizer_source).save_pretrained(tmp)
            except OSError:  # the base folder has no generation config: derive one from the model config
                GenerationConfig.from_model_config(model.config).save_pretrained(tmp)
        if finish is not None:
            finish(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_folder(model, out: str | Path, tokenizer_source: str | Path | None = None, *, dtype: str = "bfloat16",
                overwrite: bool = False, card: dict | None = None) -> Path:
    """Write ``model`` (a ``DMCLlamaForCausalLM`` or ``DMSLlamaForCausalLM``) as a self-contained HF folder at ``out``
    (atomically)."""
    if getattr(model.config, "model_type", None) not in BUNDLES:
        raise ExportError(f"save_folder needs a DMC or DMS model (model_type 'dmc_llama' or 'dms_llama'); got "
                          f"{model.config.model_type!r}")
    if hasattr(model, "fold_decision_adapters"):
        model.fold_decision_adapters()  # same function, no extra parameters in the folder

    def finish(tmp: Path) -> None:  # model.save_pretrained has bundled the code; the run's card replaces its own
        (tmp / "README.md").write_text(model_card(model.config, card or {}))

    return write_folder(model, out, tokenizer_source, dtype=dtype, overwrite=overwrite, finish=finish)


def add_remote_code(folder: str | Path, config) -> None:
    """Make a saved DMC or DMS folder load with only transformers installed: the bundled code files, ``auto_map``
    and the architecture in ``config.json``, and a model card when the folder has none."""
    folder = Path(folder)
    data = json.loads((folder / "config.json").read_text())
    model_type = data["model_type"]
    data["auto_map"] = BUNDLES[model_type].auto_map(model_type)
    data["architectures"] = [f"{BUNDLES[model_type].prefix}LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    for name, text in code_files(model_type).items():
        (folder / name).write_text(text)
    if not (folder / "README.md").exists():
        (folder / "README.md").write_text(model_card(config, {}))


def eval_table(info: dict) -> list[str]:
    """Model-card lines: the run's evaluation results, if it has any."""
    if not info.get("eval"):
        return []
    rows = [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in info["eval"].items()]
    return ["", "## Evaluation", "", "| metric | value |", "|---|---|", *rows]


def _hub_id(source) -> str | None:
    """``source`` if it names a Hub repo (ORG/NAME, not a local folder), else None: a card's ``base_model`` must
    be a Hub id."""
    text = str(source or "")
    parts = text.split("/")
    if len(parts) == 2 and all(parts) and not Path(text).exists() and not text.startswith((".", "~")):
        return text
    return None


def hub_card(lines: list[str], tags: list[str], base_model) -> str:
    """A model card built with huggingface_hub.ModelCard: valid metadata (``base_model`` only when it is a Hub
    id; a local base model is named in the text), then ``lines`` as its markdown."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="transformers", pipeline_tag="text-generation", tags=tags,
                         base_model=_hub_id(base_model))
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def model_card(config, info: dict) -> str:
    """A DMC or DMS model's card: base model, recipe, tokens seen, realised CR per layer, evaluation results if
    known."""
    base = info.get("base_model", "unknown")
    if config.model_type == "dms_llama":
        title, target, tags = "DMS Llama", config.dms_target_cr, ["dms", "dynamic-memory-sparsification"]
        what = (f"A Llama retrofitted with Dynamic Memory Sparsification (DMS) at a target compression ratio of "
                f"{target:g}x: per layer, token and KV head a gate decides whether the previous token leaves the "
                f"cache once {config.dms_window} more tokens have passed (delayed eviction).")
        setting = f"| eviction delay (window) | {config.dms_window} |"
    else:
        title, target, tags = "DMC Llama", config.dmc_target_cr, ["dmc", "dynamic-memory-compression"]
        what = (f"A Llama retrofitted with Dynamic Memory Compression (DMC) at a target compression ratio of "
                f"{target:g}x: per layer, token and KV head the model decides whether to append its key/value "
                "to the cache or merge it into the last slot, so the KV cache grows by about 1/CR per token.")
        setting = f"| merge window | {config.dmc_window or 'unbounded'} |"
    lines = [
        f"# {info.get('name', title)}",
        "",
        what,
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)  "
        f"# or `import dmc.{BUNDLES[config.model_type].modeling_entry.removesuffix('.py')}` first",
        "```",
        "",
        "| field | value |",
        "|---|---|",
        f"| base model | {base} |",
        f"| target CR | {target:g} |",
        setting,
        f"| training step | {info.get('step', 'unknown')} |",
        f"| tokens seen | {info.get('tokens_seen', 'unknown'):,} |" if isinstance(info.get("tokens_seen"), int)
        else "| tokens seen | unknown |",
    ]
    cr = info.get("cr_per_layer")
    if cr:
        lines += ["", "## Realised CR per layer (last training batch)", "",
                  "| layer | " + " | ".join(str(i) for i in range(len(cr))) + " |",
                  "|---|" + "---|" * len(cr),
                  "| CR | " + " | ".join(f"{c:.2f}" for c in cr) + " |"]
    lines += eval_table(info)
    if info.get("recipe"):
        lines += ["", "## Recipe", "", "```json", json.dumps(info["recipe"], indent=2), "```"]
    return hub_card(lines, [*tags, "kv-cache-compression", "llama"], base)
