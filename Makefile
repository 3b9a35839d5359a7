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
DOCTEST_PATHS ?= keras_primer keras_primer_runtime
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

# --no-compile: Python compiles only the modules a process imports, on first
# import, instead of every file of TensorFlow, JAX and PyTorch at install
# (2.5 -> 1 minute). tools/write_bytecode.py then imports what the tests
# import, once, so that the parallel first processes of `make test` do not
# each compile it. The byte code is written (an environment that sets
# PYTHONDONTWRITEBYTECODE would otherwise compile TensorFlow at every start).
unexport PYTHONDONTWRITEBYTECODE
$(VENV)/.installed: pyproject.toml requirements/test.txt requirements/no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile -r requirements/test.txt
	$(PY) -m pip install -q --no-compile --no-deps -r requirements/no-deps.txt
	$(PY) -m pip install -q --no-compile --no-deps --no-build-isolation -e .
	TF_CPP_MIN_LOG_LEVEL=3 $(PY) tools/write_bytecode.py
	touch $@

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

# The install check (pip resolving eight installs: about 80 CPU-seconds, and
# waits on the package index) runs beside the tests; its verdict is printed
# (and counted) at the end. One JAX
# compilation cache for every process of the run (workers and the
# subprocesses they start), removed at the end.
test: lint
	@status=0; check_log=$$(mktemp); jax_cache=$$(mktemp -d); \
	$(PY) tools/check_install.py > $$check_log 2>&1 & check=$$!; \
	export JAX_COMPILATION_CACHE_DIR=$$jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
	  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1; \
	for backend in $(BACKENDS); do \
	  echo "=== pytest, KERAS_BACKEND=$$backend ==="; start=$$(date +%s); \
	  extra=""; if [ $$backend = tensorflow ]; then extra="--doctest-modules $(DOCTEST_PATHS) tests"; fi; \
	  KERAS_BACKEND=$$backend $(PY) -m pytest -q -p no:cacheprovider \
	    -n $(PYTEST_WORKERS) --dist loadscope --durations $(PYTEST_DURATIONS) \
	    $$extra $(PYTEST_ARGS) || status=1; \
	  echo "=== KERAS_BACKEND=$$backend: $$(( $$(date +%s) - start )) s ==="; \
	done; \
	echo "=== check-install ==="; wait $$check || status=1; cat $$check_log; \
	rm -rf $$check_log $$jax_cache; exit $$status

bench: setup
	$(PY) benchmarks/primer_speed.py --backends $(shell echo $(BACKENDS) | tr ' ' ',')
	for backend in $(BACKENDS); do KERAS_BACKEND=$$backend $(PY) benchmarks/feedback_speed.py; done
	KERAS_BACKEND=tensorflow $(PY) benchmarks/export_speed.py

clean:
	rm -rf $(VENV) runs
