#!/usr/bin/env bash
# The full test suite: one parallel pytest run per Keras backend, the install
# check beside them (pip resolving ten installs waits on the package index:
# about 80 CPU-seconds), its verdict printed and counted at the end.
#
#   tools/run_tests.sh PYTHON WORKERS DURATIONS "BACKENDS" "DOCTEST_PATHS" [PYTEST_ARGS...]
#
# One JAX compilation cache serves every process of the run (the workers and
# the subprocesses they start); it is removed at the end. Called by `make test`.
set -uo pipefail
python=$1 workers=$2 durations=$3 backends=$4 doctest_paths=$5
shift 5
status=0
check_log=$(mktemp)
jax_cache=$(mktemp -d)
trap 'rm -rf "$check_log" "$jax_cache"' EXIT
"$python" tools/check_install.py >"$check_log" 2>&1 &
check=$!
export JAX_COMPILATION_CACHE_DIR=$jax_cache JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 \
  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
for backend in $backends; do
  echo "=== pytest, KERAS_BACKEND=$backend ==="
  start=$(date +%s)
  extra=()
  # Docstring examples run once, in the TensorFlow pass.
  if [ "$backend" = tensorflow ]; then extra=(--doctest-modules $doctest_paths tests); fi
  KERAS_BACKEND=$backend "$python" -m pytest -q -p no:cacheprovider -n "$workers" \
    --dist loadscope --durations "$durations" "${extra[@]}" "$@" || status=1
  echo "=== KERAS_BACKEND=$backend: $(($(date +%s) - start)) s ==="
done
echo "=== check-install ==="
wait $check || status=1
cat "$check_log"
exit $status
