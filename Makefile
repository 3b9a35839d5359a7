# Two commands for a fresh machine:
#   make demo   train a small Primer EZ on Tiny Shakespeare (CPU, a few minutes), save, generate
#   make test   lint, then the full test suite on the TensorFlow, JAX and PyTorch backends
# (Users install the package with pip instead: see README.md, "Install".)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BACKENDS ?= tensorflow jax torch
# Files ruff checks (the whole repository; settings in pyproject.toml).
LINT_PATHS ?= .
# Public docstring examples run as doctests in the TensorFlow pass.
DOCTEST_PATHS ?= keras_primer keras_primer_cli runtime/keras_primer_runtime
# pytest-xdist workers per backend pass: one more than the CPUs this process
# may use (`nproc`), at most 4 (each worker holds a framework, about 1 GB).
# The extra worker keeps the CPUs busy while another waits (measured: a
# sixth of the TensorFlow pass's CPU time was idle with one per CPU).
# PYTEST_WORKERS=0: one process. Which tests share a worker:
# SHARED_FIXTURE_MODULES in tests/conftest.py.
PYTEST_WORKERS ?= $(shell n=$$(( $$(nproc) + 1 )); echo $$(( n < 4 ? n : 4 )))
# Each pass ends with its slowest tests, to see where the time goes.
PYTEST_DURATIONS ?= 25
# Tests and the demo read Tiny Shakespeare from here when it exists (no download).
export KERAS_PRIMER_SHAKESPEARE ?= $(wildcard $(CURDIR)/../shared/data/tinyshakespeare.txt)

.PHONY: setup demo lint check-install test bench clean

setup: $(VENV)/.installed

# Byte code is written (an environment that sets PYTHONDONTWRITEBYTECODE would
# otherwise compile TensorFlow in every test process; see tools/setup_venv.sh).
unexport PYTHONDONTWRITEBYTECODE

# The pinned test environment (requirements/), both distributions editable.
$(VENV)/.installed: pyproject.toml runtime/pyproject.toml requirements/test.txt requirements/no-deps.txt
	bash tools/setup_venv.sh $(PYTHON) $(VENV)

demo: setup
	$(PY) recipes/demo.py --out runs/demo

# Fast fail: style and lint errors stop `make test` before any test runs.
lint: setup
	$(PY) -m ruff check $(LINT_PATHS)
	$(PY) -m ruff format --check $(LINT_PATHS)

# Resolves every documented `pip install keras-primer[...]` (metadata only, no
# large downloads) and checks one tensorflow, one ONNX Runtime, one CUDA major.
check-install: setup
	$(PY) tools/check_install.py

# Lint first, then tools/run_tests.sh: one pytest run per backend, the install check beside them.
test: lint
	bash tools/run_tests.sh $(PY) $(PYTEST_WORKERS) $(PYTEST_DURATIONS) "$(BACKENDS)" "$(DOCTEST_PATHS)" $(PYTEST_ARGS)

bench: setup
	bash tools/run_benchmarks.sh $(PY) "$(BACKENDS)"

clean:
	rm -rf $(VENV) runs
