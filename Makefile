# Two commands set everything up on a fresh machine:
#   make train   venv + install + MNIST + the z2 run (configs/z2.yaml)
#   make test    venv + install + MNIST + the whole test suite
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
CONFIG  ?= configs/z2.yaml
DATA    ?= data

.PHONY: venv data train test test-fast bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

data: venv
	$(PY) -c "from vae.data import ensure_mnist; ensure_mnist('$(DATA)')"

train: venv data
	$(VENV)/bin/accelerate launch train.py --config $(CONFIG)

test: venv data
	$(PY) -m pytest

test-fast: venv data
	$(PY) -m pytest -m "not slow"

bench: venv data
	$(PY) benchmarks/throughput.py

clean:
	rm -rf runs .pytest_cache

# One-shot check on a rented GPU machine: its own Python (no venv, no pip, no network), the repo on PYTHONPATH.
#   make gpu-check OUT=gpu-report     (report.md, report.json and logs in OUT; see benchmarks/gpu_check.py)
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	@if [ -z "$(OUT)" ]; then echo "make gpu-check: OUT is required, e.g. make gpu-check OUT=gpu-report" >&2; exit 2; fi
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) benchmarks/gpu_check.py --out "$(OUT)"
