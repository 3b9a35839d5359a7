#!/usr/bin/env bash
# The whole GPU run, under 10 minutes of one NVIDIA H200: install, train Primer EZ
# and the Transformer at shakespeare_char size on JAX in mixed bfloat16, print MFU,
# export to ONNX, generate with ONNX Runtime's CUDA provider (recipes/gpu_run.py).
#
#   bash benchmarks/gpu_run.sh                 # from the repository root
#   STEPS=5000 bash benchmarks/gpu_run.sh      # the preset's full budget (default 2000 steps,
#                                              # so two runs fit the 10 minutes with the install)
#   bash benchmarks/gpu_run.sh --cpu-smoke     # no install, tiny preset on the CPU: a dry run
#
# Outputs in $OUT (default runs/gpu; on the lent machine pass OUT=$OUT/gpu to get them back).
# The corpus: $KERAS_PRIMER_SHAKESPEARE, else ../shared/data/ or runs/tinyshakespeare.txt.
# A machine that reaches only package registries cannot download it: copy it to
# runs/tinyshakespeare.txt first (an ignored path: carry it along).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
LIMIT=${LIMIT:-570}  # seconds for everything, install included
start=$SECONDS
steps=()

if [[ "${1:-}" != "--cpu-smoke" ]]; then
  steps=(--steps "${STEPS:-2000}")
  # The package with its `gpu` (jax[cuda13]), `onnx-gpu` (onnxruntime-gpu with its
  # CUDA 13 libraries) and `train` extras; the versions the project is tested with
  # (requirements/test.txt) as constraints. TensorFlow stays on the CPU (README, Install).
  python3 -m venv /tmp/gpu-venv
  source /tmp/gpu-venv/bin/activate
  # `tensorflow` (what the package requires) at the tested `tensorflow-cpu` version.
  tf=$(sed -n 's/^tensorflow-cpu==//p' requirements/test.txt)
  timeout "$LIMIT" pip install -q -c requirements/test.txt "tensorflow==$tf" \
    -e ".[gpu,onnx-gpu,train]"
  python -c "import jax, onnxruntime as ort; print(jax.devices(), ort.get_available_providers())"
  echo "install: $((SECONDS - start)) s"
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave GPU memory to ONNX Runtime
fi
data=""
for f in "${KERAS_PRIMER_SHAKESPEARE:-}" ../shared/data/tinyshakespeare.txt \
  shared/data/tinyshakespeare.txt runs/tinyshakespeare.txt; do
  if [[ -n "$f" && -f "$f" ]]; then data=$f; break; fi
done
[[ -n "$data" ]] || { echo "gpu_run: no Tiny Shakespeare (see the header)" >&2; exit 2; }
export PYTHONPATH=$PWD
timeout $((LIMIT - (SECONDS - start))) \
  python -m recipes.gpu_run --out "$OUT" --data "$data" "${steps[@]}" "$@"
echo "total: $((SECONDS - start)) s"
