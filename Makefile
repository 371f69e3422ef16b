# Two commands set everything up on a fresh machine:
#   make train   venv + install + MNIST + the z2 run (configs/z2.yaml)
#   make test    venv + install + MNIST + the linter (ruff) + the whole test suite
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
CONFIG  ?= configs/z2.yaml
DATA    ?= data
# Test files side by side where there are more than 2 cores, one per core up to 4 (pytest-xdist); each file stays
# on one worker, so its module fixtures (a trained run, the Slurm cluster) are made once. On 2 cores the tests,
# real trainings, keep both busy already: side by side they took as long (848 s against 876 s). PARALLEL=
# (empty) runs them one at a time anywhere; PARALLEL="-n 4 --dist=loadfile" side by side anywhere.
PARALLEL ?= $(shell [ "$$(nproc)" -gt 2 ] && echo --numprocesses=auto --maxprocesses=4 --dist=loadfile)

.PHONY: venv data train lint test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

data: venv
	$(PY) -c "from vae.data import ensure_mnist; ensure_mnist('$(DATA)')"

train: venv data
	$(VENV)/bin/accelerate launch train.py --config $(CONFIG) data.root=$(DATA)

lint: venv
	$(PY) -m ruff check .

test: venv data lint
	VAE_TEST_DATA=$(abspath $(DATA)) $(PY) -m pytest $(PARALLEL)

test-fast: venv data
	VAE_TEST_DATA=$(abspath $(DATA)) $(PY) -m pytest $(PARALLEL) -m "not slow"

bench: venv data
	$(PY) benchmarks/throughput.py

# Caches only: trained runs (runs/) and MNIST (data/) are never deleted by make.
clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

# One-shot check on a rented GPU machine: its own Python (no venv, no pip, no network), the repo on PYTHONPATH.
#   make gpu-check OUT=gpu-report [BUDGET=seconds]  (report.md, report.json and logs in OUT; see benchmarks/gpu_check.py)
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	@if [ -z "$(OUT)" ]; then echo "make gpu-check: OUT is required, e.g. make gpu-check OUT=gpu-report" >&2; exit 2; fi
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) benchmarks/gpu_check.py --out "$(OUT)" \
		$(if $(BUDGET),--budget-s $(BUDGET))
