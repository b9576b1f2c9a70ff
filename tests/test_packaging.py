import subprocess
import sys


def test_dmc_imports_with_torch_and_transformers_only():
    # transformers' Llama modeling itself pulls triton in through torch._dynamo when triton is installed:
    # what counts is what importing dmc adds on top of that.
    code = (
        "import sys; from transformers.models.llama import modeling_llama; before = set(sys.modules);"
        "import dmc; dmc.retrofit; heavy = {'lightning', 'deepspeed', 'wandb', 'datasets', 'flash_attn', 'triton', 'gguf'};"
        "loaded = heavy & (set(sys.modules) - before); assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_every_command_and_every_row_reaches_its_entry_point():
    import importlib

    from dmc.cli import COMMANDS

    out = subprocess.run([sys.executable, "-m", "dmc.cli", "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert f"    {command.name}" in out.stdout
        module, function = command.target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), command


def test_the_cli_starts_without_torch_and_a_dmc_name_registers_the_model_type():
    # `dmc --help` and `dmc recipes` answer at once: `import dmc` loads its submodules on first use (PEP 562).
    code = (
        "import sys, contextlib, io; from dmc.cli import main\n"
        "for argv in (['--help'], ['recipes']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()): main(argv)\n"
        "assert not {'torch', 'transformers'} & set(sys.modules), sorted({'torch', 'transformers'} & set(sys.modules))\n"
        "import dmc; from transformers import AutoConfig; dmc.DMCConfig\n"
        "assert type(AutoConfig.for_model('dmc_llama')).__name__ == 'DMCLlamaConfig'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_public_name_survives_importing_every_submodule():
    # `import dmc.X` binds the submodule as the attribute X: a public name equal to a module name would be lost.
    code = (
        "import importlib, pkgutil, types, dmc\n"
        "for m in pkgutil.iter_modules(dmc.__path__): importlib.import_module('dmc.' + m.name)\n"
        "bad = [n for n in dmc.__all__ if isinstance(getattr(dmc, n), types.ModuleType)]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
