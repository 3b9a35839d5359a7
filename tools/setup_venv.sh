#!/usr/bin/env bash
# The pinned test environment in VENV (called by `make setup`):
#
#   tools/setup_venv.sh PYTHON VENV
#
# --no-compile: Python compiles only the modules a process imports, on first
# import, instead of every file of TensorFlow, JAX and PyTorch at install
# (2.5 -> 1 minute). tools/write_bytecode.py then imports what the tests
# import, once, so that the parallel first processes of `make test` do not
# each compile it. The byte code is written (an environment that sets
# PYTHONDONTWRITEBYTECODE would otherwise compile TensorFlow at every start).
# Both distributions of the repository are installed editable: the runtime
# (runtime/) first, since keras-primer requires it.
set -euo pipefail
python=$1 venv=$2
unset PYTHONDONTWRITEBYTECODE
"$python" -m venv "$venv"
py=$venv/bin/python
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q --no-compile -r requirements/test.txt
"$py" -m pip install -q --no-compile --no-deps -r requirements/no-deps.txt
"$py" -m pip install -q --no-compile --no-deps --no-build-isolation -e runtime -e .
TF_CPP_MIN_LOG_LEVEL=3 "$py" tools/write_bytecode.py
touch "$venv/.installed"
