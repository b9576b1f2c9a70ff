# make test  - create/refresh .venv, fetch + convert the embedded SmolLM2-135M, run the test suite
# make demo  - create/refresh .venv, fetch + convert SmolLM2-135M, retrofit it to ~2x on CPU, print the table
# make bench - the core speed benchmark (training step and prefill versus vanilla)
# make compare - the README's comparison: vanilla, LM-only control, DMC 2x and 4x, GQA, every policy at 2/4/8x on
#                the vanilla model and the control (trains what is missing into the run cache; CPU, hours, resumable
#                across interruptions; committed items are reused, so a complete store only reassembles the report)
# make curve - DMC's perplexity over its LM-only control's against training tokens (1, 2, 4, 8x the demo's), in the
#              same run cache (the control's and the demo's 1x runs are the comparison's); CPU, many hours,
#              resumable like make compare
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

.PHONY: venv test test-fast lint demo bench compare curve model clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,gguf,train,triton,eval,serve]"
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

# The README's comparison as a resumable chain of units (eval/protocol.py: compare-135m): the trainings it needs
# go to the run cache ($$DMC_RUN_CACHE, default ~/.cache/dmc/runs) and continue there after an interruption; every
# finished evaluation item goes to eval/results/compare-135m/items (committed); the report is assembled from the
# items alone. With every item present it prints "nothing to run" and rebuilds the same report. --jobs 2: two
# evaluations at a time, each a process with one thread (docs/baselines.md measures why).
compare: venv model
	$(PY) -m dmc.cli compare --protocol compare-135m --threads 2 --jobs 2

# The tokens curve (eval/protocol.py: curve-135m; eval/curve.py): each point is a recipe with every stage of its
# schedule times 1, 2, 4 or 8, paired on the comparison's blocks with its control trained at the same tokens.
curve: venv model
	$(PY) -m dmc.cli compare --protocol curve-135m --threads 2

clean:
	rm -rf $(VENV) .cache .pytest_cache
