#!/usr/bin/env bash
# The whole GPU run, under 10 minutes of one NVIDIA H200: install, train keras-hub GPT-2,
# Primer EZ and the Transformer at shakespeare_char size on JAX in mixed bfloat16 (time to
# GPT-2's loss), print MFU, time training steps at the benchmark size on JAX and PyTorch
# (benchmarks/primer_speed.py), export to ONNX and generate with ONNX Runtime's CUDA
# provider (recipes/gpu_run.py).
#
#   bash benchmarks/gpu_run.sh                 # from the repository root, with PyPI
#   STEPS=5000 bash benchmarks/gpu_run.sh      # the preset's full budget (default 2000 steps)
#   bash benchmarks/gpu_run.sh --cpu-smoke     # no install, tiny sizes on the CPU: a dry run
#
# A machine with JAX on CUDA but no package index (the lent H200 image has Python 3.12,
# JAX, PyTorch and NumPy, no Keras, no TensorFlow): download what it lacks here, carry it,
# and run there from the wheels. Without TensorFlow there is no ONNX export (steps 3-4).
#
#   bash benchmarks/gpu_run.sh --download-wheels .whl     # here (requirements/gpu-image.txt)
#   WHEELS=.whl bash benchmarks/gpu_run.sh                # there
#
# Outputs in $OUT (default runs/gpu): log.txt, per_step.jsonl and results.tgz (every
# run's tables, curves and plots, without weights). The corpus: $KERAS_PRIMER_SHAKESPEARE,
# else ../shared/data/ or runs/tinyshakespeare.txt. A machine that reaches no network
# cannot download it: copy it to runs/tinyshakespeare.txt first (an ignored path: carry it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
LIMIT=${LIMIT:-570}         # seconds for everything, install included
PER_STEP=${PER_STEP:-150}   # of those, kept for the per-step timings after training
PYTHON_VERSION=${PYTHON_VERSION:-3.12}  # of the machine the wheels are for

if [[ "${1:-}" == "--download-wheels" ]]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp \
    --python-version "$PYTHON_VERSION" --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 -c requirements/test.txt -c requirements/no-deps.txt \
    -r requirements/gpu-image.txt -d "${2:?--download-wheels DIR}"
  exit
fi

start=$SECONDS
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
left() { echo $((LIMIT - (SECONDS - start))); }
pack() {  # what comes back from a lent machine: small files, no weights
  (cd "$OUT" && find . -name '*.json' -o -name '*.csv' -o -name '*.md' -o -name '*.png' \
    | tar -czf results.tgz -T -) || true
}
trap pack EXIT

smoke=()
run_args=(--steps "${STEPS:-2000}")
if [[ "${1:-}" == "--cpu-smoke" ]]; then
  smoke=(--quick)
  run_args=(--cpu-smoke)
  shift
fi
if [[ -n "${WHEELS:-}" ]]; then
  # Keras and keras-hub over the machine's own Python, JAX and PyTorch.
  python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/gpu-site \
    "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/gpu-site
  run_args+=(--no-export)
elif [[ ${#smoke[@]} -eq 0 ]]; then
  # The package with its `gpu` (jax[cuda13]), `onnx-gpu` (onnxruntime-gpu with its
  # CUDA 13 libraries) and `train` extras; the versions the project is tested with
  # (requirements/test.txt) as constraints. TensorFlow stays on the CPU (README, Install).
  python3 -m venv /tmp/gpu-venv
  source /tmp/gpu-venv/bin/activate
  # `tensorflow` (what the package requires) at the tested `tensorflow-cpu` version.
  tf=$(sed -n 's/^tensorflow-cpu==//p' requirements/test.txt)
  # Both distributions of the repository: the runtime (runtime/) first, as
  # keras-primer requires it.
  timeout "$(left)" pip install -q -c requirements/test.txt "tensorflow==$tf" \
    -e "runtime[gpu,sentencepiece]" -e ".[gpu,onnx-gpu,train]"
fi
if [[ ${#smoke[@]} -eq 0 ]]; then
  python3 -c "import jax; print(jax.devices())"
  export XLA_PYTHON_CLIENT_PREALLOCATE=false  # leave GPU memory to ONNX Runtime and PyTorch
fi
echo "install: $((SECONDS - start)) s"
data=""
for f in "${KERAS_PRIMER_SHAKESPEARE:-}" ../shared/data/tinyshakespeare.txt \
  shared/data/tinyshakespeare.txt runs/tinyshakespeare.txt; do
  if [[ -n "$f" && -f "$f" ]]; then data=$f; break; fi
done
[[ -n "$data" ]] || { echo "gpu_run: no Tiny Shakespeare (see the header)" >&2; exit 2; }
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout $(($(left) - PER_STEP)) \
  python3 -m recipes.gpu_run --out "$OUT" --data "$data" "${run_args[@]}" "$@" \
  || echo "recipes.gpu_run: exit $?"

# Per-step cost at the benchmark size, GPT-2 beside ours, each backend in its own process:
# JAX (XLA), PyTorch eager, then torch.compile (the slowest to compile, so last).
echo "=== per-step training speed ($((SECONDS - start)) s since start) ==="
speed() {
  KERAS_BACKEND=$1 timeout "$(left)" python3 benchmarks/primer_speed.py --single-backend \
    --train-only --models transformer_baseline --modes "$2" "${smoke[@]}" \
    | tee -a "$OUT/per_step.jsonl" || echo "primer_speed $1 $2: exit $?"
}
speed jax default
if python3 -c "import torch" 2>/dev/null; then
  speed torch default
  speed torch jit
fi

# Serving on CUDA (issue 31.8), when exports made on a CPU machine were carried here
# (`python benchmarks/serving_speed.py export --out DIR` there; SERVING=DIR here): OrtGenerator
# with its state on the device against Optimum's GPT-2 on CUDA, interleaved. Optimum needs
# its own packages (requirements/optimum-bench.txt, with a CUDA torch and onnxruntime-gpu).
if [[ -n "${SERVING:-}" ]]; then
  echo "=== serving on CUDA ($((SECONDS - start)) s since start) ==="
  timeout "$(left)" python3 benchmarks/serving_speed.py time --out "$SERVING" --device cuda \
    --runtimes ort,optimum,optimum_bare --models primer_ez | tee -a "$OUT/serving.jsonl" \
    || echo "serving_speed: exit $?"
fi
echo "total: $((SECONDS - start)) s"
