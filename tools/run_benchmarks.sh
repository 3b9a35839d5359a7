#!/usr/bin/env bash
# Every benchmark of benchmarks/ on BACKENDS (called by `make bench`); each
# prints one JSON object a line. Run on an idle machine.
#
#   tools/run_benchmarks.sh PYTHON "BACKENDS"
set -euo pipefail
python=$1 backends=$2
"$python" benchmarks/primer_speed.py --backends "$(echo $backends | tr ' ' ',')"
for backend in $backends; do KERAS_BACKEND=$backend "$python" benchmarks/feedback_speed.py; done
KERAS_BACKEND=tensorflow "$python" benchmarks/export_speed.py
