#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): the CUDA kernel tests and a Llama-2-7B-shape benchmark, one JSON.
#   bash scripts/gpu_check.sh [--out bench/results/gpu_check.json]   one NVIDIA GPU, about 8 minutes
#   bash scripts/gpu_check.sh --dry-run                              tiny shapes on the CPU (what CI runs)
# The machine needs no network: torch, triton and transformers installed (flash-attn optional). Missing small
# pure-Python packages come from wheels in $WHEELS (default ./wheels), the ones named here:
#   pytest pluggy iniconfig packaging tqdm safetensors huggingface_hub
# and this repo is installed from the working tree without dependencies (the installed torch is left alone).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
WHEELS=${WHEELS:-wheels}

need() {  # need MODULE PACKAGE: install PACKAGE from the carried wheels when MODULE does not import
  "$PY" -c "import $1" 2>/dev/null && return 0
  [ -d "$WHEELS" ] || { echo "gpu_check: error: python module $1 is missing and there is no $WHEELS/ folder of wheels" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$2"
}
need torch torch
need transformers transformers
need pytest pytest
need tqdm tqdm
"$PY" -c "import dmc.eval.serving" 2>/dev/null \
  || "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e .
exec "$PY" bench/gpu_check.py "$@"
