"""The user's install: the wheel built from this tree, installed into a fresh virtual environment, run from an
empty folder: `dmc recipes`, `dmc train --config tiny` (a packaged recipe), `dmc export`, `dmc eval --tasks ppl`.
Nothing of the checkout is importable there: `import train` fails and every module comes from the wheel."""

import os
import subprocess
import sys
import sysconfig
import time
import venv
import zipfile
from pathlib import Path

import pytest

from tests.helpers import ROOT, SMOLLM2, write_tiny_checkpoint

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (SMOLLM2 / "config.json").exists(), reason="run `make model` first")]


def _source_copy(dest: Path) -> Path:
    """The tree's files git knows of (tracked or not ignored), so the build sees the working tree and leaves no
    build/ or egg-info in the checkout."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
    return dest


def _build_wheel(tmp: Path) -> Path:
    src = _source_copy(tmp / "src")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(src)], check=True, capture_output=True, text=True)
    return next((tmp / "dist").glob("dmc-*.whl"))


def _fresh_env(tmp: Path, wheel: Path) -> Path:
    """A new venv holding only the wheel; the dependencies are this environment's, reached through a .pth line.
    A plain path line adds the folder without running the .pth files in it, so the checkout's editable-install
    hook stays off and only the wheel's `dmc` can be imported."""
    env = tmp / "env"
    venv.create(env, with_pip=False)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(env), "platbase": str(env)}))
    (site / "reused_dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q",
                    "--no-deps", str(wheel)], check=True, capture_output=True, text=True)
    return env


def test_the_wheel_in_a_fresh_environment_trains_exports_and_evaluates_from_an_empty_folder(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert "dmc/configs/tiny.yaml" in names and "dmc/configs/deepspeed/zero3.json" in names
    assert "dmc/train/run.py" in names and "dmc/serve/app.py" in names and not any(n.startswith(("train/", "data/", "eval/")) for n in names)
    env = _fresh_env(tmp_path, wheel)
    work = tmp_path / "empty"
    work.mkdir()
    tiny = write_tiny_checkpoint(tmp_path / "tiny-llama")
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env_vars = dict(clean, PATH=f"{env / 'bin'}:{clean['PATH']}", HF_HUB_OFFLINE="1",
                    TORCH_EXTENSIONS_DIR=str(ROOT / ".cache/torch_extensions"))

    def dmc(*args):
        done = subprocess.run(["dmc", *args], cwd=work, env=env_vars, capture_output=True, text=True, timeout=600,
                              check=False)
        assert done.returncode == 0, f"dmc {' '.join(args)}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        return done.stdout

    code = "import dmc.train.run as m, dmc.configs as c; print(m.__file__); print(c.__file__)"
    where = subprocess.run(["python", "-c", code], cwd=work, env=env_vars, capture_output=True, text=True, check=True)
    assert all(str(env) in line for line in where.stdout.split()), where.stdout  # the wheel's, not the checkout's
    shadow = subprocess.run(["python", "-c", "import train"], cwd=work, env=env_vars, capture_output=True, text=True,
                            check=False)
    assert shadow.returncode != 0 and "No module named 'train'" in shadow.stderr

    listing = dmc("recipes")
    assert "tiny" in listing and "llama2-7b-4x" in listing
    dmc("train", "--config", "tiny", "--model.path", str(tiny), "--run.out_dir", "run",
        "--schedule.stage1_steps", "1", "--schedule.ramp_steps", "1", "--schedule.finetune_steps", "0")
    assert (work / "run" / "ckpt").is_dir()
    dmc("export", "run", "--out", "hf", "--tokenizer", str(tiny))
    assert (work / "hf" / "config.json").exists()
    out = dmc("eval", "hf", "--tasks", "ppl", "--ppl-blocks", "2", "--ppl-block", "32", "--out", "results")
    assert (work / "results" / "results.json").exists(), out
    _serve_from_the_wheel(work, env_vars)


def _serve_from_the_wheel(work: Path, env_vars: dict) -> None:
    """`dmc serve hf` from the wheel answers an OpenAI client, and stops on Ctrl-C."""
    import signal

    import openai

    from dmc.serve.launch import free_port

    port = free_port()
    proc = subprocess.Popen(["dmc", "serve", "hf", "--port", str(port), "--max-seqs", "4"], cwd=work, env=env_vars,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for _ in range(1500):  # up to about 5 minutes to load, on a loaded machine
            if proc.poll() is not None:
                raise AssertionError(f"dmc serve exited: {proc.stderr.read()}")
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                time.sleep(0.2)
        assert [m.id for m in models.data] == ["hf"]
        reply = client.completions.create(model="hf", prompt="def f(x):", max_tokens=5, temperature=0)
        assert reply.usage.completion_tokens == 5
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
