# Two commands set everything up on a fresh machine:
#   make train   venv + install (the lock) + MNIST + the z2 run (configs/z2.yaml)
#   make test    venv + install (the lock) + MNIST + the linter (ruff) + the whole test suite
# and two keep the install honest (docs/testing.md):
#   make lock         requirements/lock.txt refreshed to the newest releases pyproject.toml allows
#   make test-latest  those newest releases in a venv of their own (.venv-latest), tested before they are locked
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
CONFIG  ?= configs/z2.yaml
DATA    ?= data
LOCK    := requirements/lock.txt
# Test files side by side where there are more than 2 cores, one per core up to 4 (pytest-xdist); each file stays
# on one worker, so its module fixtures (a trained run, the Slurm cluster) are made once. On 2 cores the tests,
# real trainings, keep both busy already: side by side they took as long (848 s against 876 s). PARALLEL=
# (empty) runs them one at a time anywhere; PARALLEL="-n 4 --dist=loadfile" side by side anywhere.
PARALLEL ?= $(shell [ "$$(nproc)" -gt 2 ] && echo --numprocesses=auto --maxprocesses=4 --dist=loadfile)

.PHONY: venv data train lint test test-fast test-latest lock bench clean

venv: $(VENV)/.installed

# The exact versions CI passed with (requirements/lock.txt, every file's hash checked), then the project itself
# without touching them. pyproject.toml keeps the ranges for `pip install -e .`; `make lock` refreshes the lock.
# The lock is resolved for CI's platform (Linux x86-64, Python 3.11); elsewhere (macOS, another Python) the
# ranges are installed instead, and make says so.
LOCKED_FOR := Linux x86_64 3.11
PLATFORM = $(shell $(PYTHON) -c 'import platform, sys; print(platform.system(), platform.machine(), "%d.%d" % sys.version_info[:2])')
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	@if [ "$(PLATFORM)" = "$(LOCKED_FOR)" ]; then \
		echo "$(PY) -m pip install --require-hashes -r $(LOCK)"; \
		$(PY) -m pip install --quiet --require-hashes -r $(LOCK) && \
		$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .; \
	else \
		echo "make: the lock is for $(LOCKED_FOR), this is $(PLATFORM): installing pyproject.toml's ranges"; \
		$(PY) -m pip install --quiet --upgrade pip && $(PY) -m pip install --quiet -e '.[test]'; \
	fi
	touch $@

data: venv
	$(PY) -c "from vae.datasets.mnist import ensure_mnist; ensure_mnist('$(DATA)')"

train: venv data
	$(VENV)/bin/accelerate launch train.py --config $(CONFIG) data.root=$(DATA)

lint: venv
	$(PY) -m ruff check .

test: venv data lint
	VAE_TEST_DATA=$(abspath $(DATA)) $(PY) -m pytest $(PARALLEL)

test-fast: venv data
	VAE_TEST_DATA=$(abspath $(DATA)) $(PY) -m pytest $(PARALLEL) -m "not slow"

# Every exact version (with its files' hashes) that make installs, resolved from pyproject.toml's ranges and
# requirements/tools.in (pip, setuptools), with requirements/hold.txt's releases held; by pip-tools in a venv of
# its own. Run the suite on the new lock (make test) before committing it.
LOCK_VENV := .venv-lock
lock:
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet pip-tools
	$(LOCK_VENV)/bin/pip-compile --quiet --upgrade --generate-hashes --allow-unsafe --strip-extras \
		--no-emit-index-url --no-emit-find-links --extra test --extra tensorboard \
		--output-file $(LOCK) pyproject.toml requirements/tools.in

# The next breakage before a user meets it: the newest releases pyproject.toml allows (no lock), installed afresh
# in .venv-latest, running the fast tests, the Slurm jobs and the real several-process launches.
LATEST := .venv-latest
test-latest: data
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet --upgrade --upgrade-strategy eager -e '.[test]'
	@echo "test-latest: $$($(LATEST)/bin/python -m pip list --format=freeze | \
		grep -iE '^(torch|torchvision|accelerate|wandb|tensorboard|rich|matplotlib|pyyaml|pytest|numpy)==' | tr '\n' ' ')"
	VAE_TEST_DATA=$(abspath $(DATA)) $(LATEST)/bin/python -m pytest $(PARALLEL) -m "not slow or slurm or launcher"

bench: venv data
	$(PY) benchmarks/throughput.py

# Caches only: trained runs (runs/) and MNIST (data/) are never deleted by make.
clean:
	rm -rf .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

# One-shot check on a rented GPU machine: its own Python (no venv, no pip, no network), the repo on PYTHONPATH.
#   make gpu-check OUT=gpu-report [BUDGET=seconds]  (470 s by default: every step capped, under 8 minutes in all;
#   report.md, report.json and logs in OUT; the steps and their caps: docs/gpu.md, benchmarks/gpu_check.py)
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	@if [ -z "$(OUT)" ]; then echo "make gpu-check: OUT is required, e.g. make gpu-check OUT=gpu-report" >&2; exit 2; fi
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) benchmarks/gpu_check.py --out "$(OUT)" \
		$(if $(BUDGET),--budget-s $(BUDGET))
