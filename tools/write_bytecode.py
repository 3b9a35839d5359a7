"""Writes the byte code of what the test processes import, once, in one process.

`make setup` installs with `pip install --no-compile`: compiling every file of
TensorFlow, JAX and PyTorch at install takes minutes, most of them never
imported. Without this step the first processes of `make test` (the parallel
workers and the subprocesses they start, all at once) would each compile the
same few thousand modules (about 16 CPU seconds each on a CI core) before
any of them had written the byte code. Run by `make setup`; harmless to rerun.
"""

import compileall
import importlib
import os
import sys

# Imported, so that each module's own imports are compiled too. Keras imports
# only the backend KERAS_BACKEND names: every backend's modules are compiled
# below, whichever that is.
MODULES = (
    "keras_primer",
    "keras_primer.training",
    "keras_primer.training.compare",
    "keras_primer.export.saved_model",
    "keras_primer.export.onnx_export",
    "keras_primer_cli.main",
    "keras_primer_runtime.ort_generator",
    "keras_primer_runtime.serving_client",
    "tensorflow.python.tools.saved_model_cli",
    "onnxruntime.quantization",
    "matplotlib.pyplot",
    "jax",
    "torch",
    "pytest",
    "xdist",
)


def main() -> int:
    sys.dont_write_bytecode = False  # an environment may set PYTHONDONTWRITEBYTECODE
    for name in MODULES:
        importlib.import_module(name)
    import keras

    backends = os.path.join(os.path.dirname(keras.__file__), "src", "backend")
    for backend in ("tensorflow", "jax", "torch"):
        compileall.compile_dir(os.path.join(backends, backend), quiet=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
