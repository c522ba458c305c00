# moe-routing-bench: `make bench` and `make test` are the whole set-up.
# Both create .venv on first use (CPU torch on a machine without CUDA; a CUDA torch that the
# system python already has is kept, never reinstalled), then run.

PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-stamp
# CPU wheel on a machine without CUDA; on a GPU box the system torch is reused instead.
TORCH_CPU := torch==2.13.0
# CPU-only machines (Linux) also pin triton to the GPU host's version (triton 3.6 beside torch
# 2.11 there): the CPU tier runs the Triton kernels in its interpreter and compiles them for sm_90
# with it, so what passes here is the language and compiler the GPU runs. A GPU box keeps its own.
TRITON_CPU := triton==3.6.0
PYTEST := $(VPY) -m pytest
ARGS ?=

.PHONY: setup test test-all test-gpu lint format bench report compare bench-route bench-kernels gpu-check gpu-check-dry mutate clean

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
	if [ "$$(uname -s)" = Linux ] && ! $(VPY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
	  $(VPY) -m pip install --quiet $(TRITON_CPU); \
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

# Mutation testing of the routing rules (tests/mutate.py; about 35 minutes on 2 cores for all 15
# modules, each mutant running only the tests that cover its lines; sessions resume).
# ARGS="--modules positions,contract --workers 2" narrows it.
mutate: setup
	@$(VPY) -c "import cosmic_ray, pytest_cov" 2>/dev/null || $(VPY) -m pip install --quiet -e ".[mutate]"
	$(VPY) tests/mutate.py $(ARGS)

lint: setup
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

format: setup
	$(VPY) -m ruff format .
	$(VPY) -m ruff check --fix .

# The main job: the default sweep (every router x workload x size), then its report.
BENCH_CONFIG ?= default
bench: setup
	$(VENV)/bin/moe-bench run --config $(BENCH_CONFIG) $(ARGS)
	$(VENV)/bin/moe-bench report $$(ls -1d results/2*/ | tail -1)

# Render the newest run (or RUN=results/<id>) into RUN/report/.
report: setup
	$(VENV)/bin/moe-bench report $(or $(RUN),$$(ls -1d results/2*/ | tail -1)) $(ARGS)

# What changed between two runs: make compare A=results/<id> B=results/<id>
compare: setup
	$(VENV)/bin/moe-bench compare $(A) $(B) $(ARGS)

bench-route: setup
	$(VENV)/bin/moe-bench route-cost $(ARGS)

# Dispatch-kernel microbenchmarks on this machine's device (pytest-benchmark; not part of `make test`).
bench-kernels: setup
	@mkdir -p results/kernels
	$(PYTEST) bench/microbench/bench_kernels.py -p no:cacheprovider -rP --benchmark-enable --benchmark-columns=median,iqr,rounds \
	  --benchmark-json=results/kernels/$$(date +%Y%m%d-%H%M%S).json $(ARGS)

# The one prepared GPU check (tests/gpu, then the permute/combine bandwidth benchmark), for a GPU
# host whose python3 already has torch + triton and no internet: nothing is installed or fetched.
# It uses .venv where one exists, else the system python3. ARGS=--dry-run rehearses it on CPU.
# Without an install, the import name moe_routing_bench comes from links in build/pkgroot/ to the
# root folders (the same mapping pyproject.toml's package-dir makes at install time).
GPU_PYTHON ?= $(shell test -x $(VPY) && echo $(VPY) || echo python3)
PKGROOT := build/pkgroot
gpu-check:
	@mkdir -p $(PKGROOT)/moe_routing_bench
	@for d in bench routers kernels workloads; do ln -sfn "$(CURDIR)/$$d" $(PKGROOT)/moe_routing_bench/$$d; done
	PYTHONPATH=$(PKGROOT)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) -m moe_routing_bench.bench.microbench.gpu_check $(ARGS)

gpu-check-dry: setup
	$(VPY) -m moe_routing_bench.bench.microbench.gpu_check --dry-run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis .benchmarks *.egg-info
