"""Timing helpers shared by the scripts in `benchmarks/`."""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import date

import keras
import numpy as np


def compile_function(fn, model):
    """`fn` compiled the way the current backend compiles (eager on PyTorch).

    On JAX the model's variables become explicit jit arguments, so the compiled
    function reads their current values instead of baking them in.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        variables = model.variables

        @jax.jit
        def run(values, *args):
            with keras.StatelessScope(state_mapping=list(zip(variables, values))):
                return fn(*args)

        return lambda *args: run([v.value for v in variables], *args)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    return fn


def block(value):
    """Waits for asynchronous backends by pulling results to the host."""
    keras.tree.map_structure(lambda x: keras.ops.convert_to_numpy(x), value)
    return value


def median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    """Median wall time of `fn()` over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        block(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_description() -> dict:
    return {
        "date": date.today().isoformat(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
    }


def run_per_backend(script: str, backends: list[str], extra_args: list[str]) -> list[dict]:
    """Runs `script` once per backend in a subprocess; collects its JSON line."""
    results = []
    for backend in backends:
        env = dict(os.environ, KERAS_BACKEND=backend)
        out = subprocess.run(
            [sys.executable, script, "--single-backend", *extra_args],
            env=env, check=True, capture_output=True, text=True,
        ).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def random_token_ids(batch: int, length: int, vocabulary_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocabulary_size, size=(batch, length)).astype("int32")
