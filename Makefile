# Two commands for a fresh machine:
#   make demo   train a small Primer EZ on Tiny Shakespeare (CPU, a few minutes), save, generate
#   make test   the full test suite on the TensorFlow, JAX and PyTorch backends
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BACKENDS ?= tensorflow jax torch
# Tests and the demo read Tiny Shakespeare from here when it exists (no download).
export KERAS_PRIMER_SHAKESPEARE ?= $(wildcard $(CURDIR)/../shared/data/tinyshakespeare.txt)

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/test.txt requirements/no-deps.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/test.txt
	$(PY) -m pip install -q --no-deps -r requirements/no-deps.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

demo: setup
	$(PY) recipes/demo.py --out runs/demo

test: setup
	@status=0; for backend in $(BACKENDS); do \
	  echo "=== pytest, KERAS_BACKEND=$$backend ==="; \
	  KERAS_BACKEND=$$backend $(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) || status=1; \
	done; exit $$status

bench: setup
	$(PY) benchmarks/primer_speed.py --backends $(shell echo $(BACKENDS) | tr ' ' ',')
	for backend in $(BACKENDS); do KERAS_BACKEND=$$backend $(PY) benchmarks/feedback_speed.py; done
	KERAS_BACKEND=tensorflow $(PY) benchmarks/export_speed.py

clean:
	rm -rf $(VENV) runs
