import subprocess
import sys


def test_dmc_imports_with_torch_and_transformers_only():
    # transformers' Llama modeling itself pulls triton in through torch._dynamo when triton is installed:
    # what counts is what importing dmc adds on top of that.
    code = (
        "import sys; from transformers.models.llama import modeling_llama; before = set(sys.modules);"
        "import dmc; heavy = {'lightning', 'deepspeed', 'wandb', 'datasets', 'flash_attn', 'triton', 'gguf'};"
        "loaded = heavy & (set(sys.modules) - before); assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "dmc.cli", "--help"], capture_output=True, text=True, check=True)
    assert all(command in out.stdout for command in ("fetch-smollm2", "bench-core", "rehearse", "compare"))
