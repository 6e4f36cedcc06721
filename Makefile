# Set-up and the commands of the README. `make train` and `make test` set up .venv first if needed.
#   TORCH_SPEC: the torch installed when the venv has none (CPU/MPS/CUDA build by platform from PyPI);
#               install your own build into .venv first to keep it, e.g. a specific CUDA wheel.
#   ARGS: Hydra overrides for train, e.g. make train ARGS="model=cnn trainer.accelerator=mps"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.stellarlab-installed

.PHONY: setup train test test-fast test-min bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[all,test]"
	touch $(STAMP)

train: setup
	$(BIN)/python train.py $(ARGS)

# The whole suite (what CI runs), with the 15 slowest tests listed at the end.
test: setup
	$(BIN)/python -m pytest -ra --durations=15 $(PYTEST_ARGS)

# The fast tier: no subprocess, no end-to-end training (under 3 minutes on 2 cores).
test-fast: setup
	$(BIN)/python -m pytest -ra -m "not slow" --durations=15 $(PYTEST_ARGS)

# The lowest versions pyproject.toml allows, installed into .venv-min, then the fast tier (.ci/test-min).
test-min:
	PYTHON=$(PYTHON) .ci/test-min

bench: setup
	$(BIN)/python -m benchmarks run $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-min outputs .pytest_cache
