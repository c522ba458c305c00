# moe-routing-bench: `make bench` and `make test` are the whole set-up.
# Both create .venv on first use (CPU torch on a machine without CUDA; a CUDA torch that the
# system python already has is kept, never reinstalled), then run.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
# CPU wheel on a machine without CUDA; on a GPU box the system torch is reused instead.
TORCH_CPU := torch==2.13.0
PYTEST := $(VPY) -m pytest
ARGS ?=

.PHONY: setup test test-all test-gpu lint format bench bench-route clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@set -e; \
	if [ ! -x $(VPY) ]; then \
	  if $(PYTHON) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	    echo "setup: CUDA torch found in $(PYTHON); creating $(VENV) on top of it"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi; \
	if $(VPY) -c "import torch" 2>/dev/null; then \
	  echo "setup: keeping torch $$($(VPY) -c 'import torch; print(torch.__version__)')"; \
	else \
	  echo "setup: installing CPU $(TORCH_CPU)"; \
	  $(VPY) -m pip install --quiet $(TORCH_CPU); \
	fi; \
	$(VPY) -m pip install --quiet -e ".[dev]"; \
	touch $(STAMP); \
	echo "setup: done ($(VENV))"

test: setup
	$(PYTEST) -q $(ARGS)

test-all: setup
	$(PYTEST) -q -m "not gpu" $(ARGS)

test-gpu: setup
	$(PYTEST) -q -m gpu $(ARGS)

lint: setup
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format: setup
	$(VPY) -m ruff format .
	$(VPY) -m ruff check --fix .

# Until the full harness lands (`moe-bench run`), the main job compares every registered router
# on the uniform workload, then measures routing cost against a bare softmax + topk.
BENCH_ROUTE ?= --router all --tokens 4096 --experts 64 --capacity-factor 1.25 --batches 100
bench: setup
	$(VENV)/bin/moe-bench route $(BENCH_ROUTE) $(ARGS)
	$(VPY) -m bench.route_perf --tokens 262144


bench-route: setup
	$(VPY) -m bench.route_perf $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .benchmarks *.egg-info
