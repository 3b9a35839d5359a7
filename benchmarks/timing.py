"""Timing helpers shared by the scripts in `benchmarks/` (imported as `timing`:
a script's own folder is first on `sys.path`)."""

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


def compile_plain(fn):
    """`fn` (tensors in, tensors out, no model state) compiled the way the
    current backend compiles: `tf.function(jit_compile=True)`, `jax.jit`, eager
    on PyTorch."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.jit(fn)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, jit_compile=True)
    return fn


def block(value):
    """Waits until an asynchronous backend has computed `value`.

    Pulls one element of each tensor to the host, not the whole tensor: on an
    accelerator the copy would be timed too (an 8192 x 8192 bfloat16 matmul
    measured 6 TFLOP/s on an H200 that way, its result's copy to the host).
    """
    if keras.backend.backend() == "jax":
        import jax

        return jax.block_until_ready(value)

    def first_element(x):
        x = keras.ops.convert_to_tensor(x)
        return keras.ops.convert_to_numpy(keras.ops.reshape(x, (-1,))[:1])

    keras.tree.map_structure(first_element, value)
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
        "device": device_description(),
    }


def device_description() -> str:
    """The device the backend computes on: "cpu", or the accelerator's name."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return "cpu" if device.platform == "cpu" else device.device_kind
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return gpus[0].name if gpus else "cpu"
    return "unknown"


def keras_hub_gpt2(size: dict):
    """keras-hub's `GPT2CausalLM` of the given size (`vocabulary_size`,
    `num_layers`, `num_heads`, `hidden_dim`, `intermediate_dim`,
    `max_sequence_length`), dropout 0: the peer a Keras user would pick."""
    import keras_hub

    backbone = keras_hub.models.GPT2Backbone(**size, dropout=0.0)
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


def interleaved_train_step_seconds(
    models: dict, batch: int, context: int, vocabulary_size: int, repeats: int, warmup: int = 2
) -> dict:
    """Median `train_on_batch` seconds of each compiled model, one random batch,
    the models' steps interleaved so that machine noise hits them alike."""
    ids = random_token_ids(batch, context + 1, vocabulary_size)
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    y = ids[:, 1:]
    for model in models.values():  # compile + warm up
        for _ in range(warmup):
            model.train_on_batch(x, y)
    seconds = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            seconds[name].append(time.perf_counter() - start)
    return {name: statistics.median(s) for name, s in seconds.items()}


def json_lines_per_backend(script: str, backends: list[str], extra_args: list[str]) -> list[dict]:
    """Runs `script --single-backend` once per backend in a fresh process and
    returns every JSON line it printed (one figure a line)."""
    figures = []
    for backend in backends:
        env = dict(os.environ, KERAS_BACKEND=backend)
        out = subprocess.run(
            [sys.executable, script, "--single-backend", *extra_args],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        figures += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return figures


def random_token_ids(batch: int, length: int, vocabulary_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocabulary_size, size=(batch, length)).astype("int32")
