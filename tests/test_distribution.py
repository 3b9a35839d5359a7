"""Many devices on CPU: JAX with 4 host devices, TensorFlow with 2 logical CPUs.

Device counts must be fixed before JAX/TensorFlow start, so each check runs
in a fresh subprocess (once, in the TensorFlow-backend pass). One process per
device setup runs both the library (`distribution_scope`) and the recipe
(`keras-primer train`'s `main`, in the same process) on one device and on
all of them.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# A hang guard only (many times a loaded 2-core machine's time): a test fails
# for a wrong result, never for a slow box (issue 20).
HANG_GUARD_S = 1800

# `keras-primer train` flags of every recipe run here (--jit-compile stays
# auto: XLA on JAX, where eager steps compile every op; graph mode on
# TensorFlow's CPU).
CLI_FLAGS = [
    "--preset",
    "tiny",
    "--steps",
    "4",
    "--batch-size",
    "8",
    "--sequence-length",
    "16",
    "--eval-interval",
    "4",
    "--sample-tokens",
    "8",
    "--no-tensorboard",
    "--verbose",
    "0",
    "--seed",
    "3",
]

COMMON = """
import contextlib, io, json, sys
import numpy as np, keras
from keras_primer import PrimerBackbone, PrimerCausalLM, PrimerCausalLMPreprocessor, PrimerTokenizer
from keras_primer_cli.train import main

def build(optimizer=None):
    keras.utils.set_random_seed(0)
    backbone = PrimerBackbone(vocabulary_size=256, num_layers=1, num_heads=2, hidden_dim=16,
                              intermediate_dim=32, max_sequence_length=16)
    lm = PrimerCausalLM(backbone, PrimerCausalLMPreprocessor(PrimerTokenizer(), sequence_length=16))
    lm.compile(optimizer=optimizer or keras.optimizers.AdamW(1e-3), sampler="greedy")
    return lm

rng = np.random.default_rng(0)
ids = rng.integers(4, 256, size=(8, 16)).astype("int32")
x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
y = np.roll(ids, -1, axis=1)

def loss(lm):
    return keras.Model.evaluate(lm, x, y, batch_size=8, verbose=0, return_dict=True)["loss"]

out_root, data, cli_flags = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def cli(name, *flags):  # `keras-primer train` in this process: (exit status, stderr)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        status = main(["--out", f"{out_root}/{name}", "--data", data, *cli_flags, *flags])
    return status, err.getvalue()
"""

JAX_SCRIPT = (
    COMMON
    + """
from keras_primer.training.distribution import distribution_scope, generate
assert len(keras.distribution.list_devices()) == 4, keras.distribution.list_devices()
reference = loss(build())
for kind in ("data_parallel", "model_parallel"):
    with distribution_scope(kind) as plan:
        lm = build()
        if kind == "model_parallel":
            sharded = [v for v in lm.weights if "intermediate/kernel" in v.path][0]
            assert "model" in str(sharded.value.sharding.spec), sharded.value.sharding
        value = loss(lm)
        assert abs(value - reference) < 1e-4, (kind, value, reference)
        keras.Model.fit(lm, x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
        out = generate(lm, ["ROMEO:", "JULIET:", "A"], max_length=12)  # 3 prompts, 4 devices
        assert len(out) == 3 and out[1].startswith("JULIET:"), out
    print(kind, "ok", value, reference)
# The recipe: one device (no --distribution), then sharded over the four.
for name, flags in (("single", ()), ("data_parallel", ("--distribution", "data_parallel")),
                    ("model_parallel", ("--distribution", "model_parallel"))):
    status, err = cli(name, *flags)
    assert status == 0, err
status, err = cli("bad", "--distribution", "data_parallel", "--batch-size", "6")
print(json.dumps({"bad": [status, err]}))
"""
)

# Two logical CPUs must exist before TensorFlow starts.
TWO_LOGICAL_CPUS = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""

TF_SCRIPT = (
    TWO_LOGICAL_CPUS
    + COMMON
    + """
reference = loss(build())
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
assert strategy.num_replicas_in_sync == 2
with strategy.scope():
    lm = build()
value = loss(lm)
assert abs(value - reference) < 1e-4, (value, reference)
keras.Model.fit(lm, x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
out = lm.generate(["ROMEO:", "JULIET:", "A"], max_length=12)
assert len(out) == 3 and out[0].startswith("ROMEO:"), out
# Clipping that bites (clipnorm 0.01): keras_primer's AdamW clips the summed
# gradient, so two replicas train exactly as one device.
from keras_primer.training.optimizer import AdamW
one = build(AdamW(1e-2, clipnorm=0.01))
keras.Model.fit(one, x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)
with strategy.scope():
    two = build(AdamW(1e-2, clipnorm=0.01))
keras.Model.fit(two, x, y, batch_size=8, epochs=3, verbose=0, shuffle=False)
for a, b in zip(one.weights, two.weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-5, err_msg=a.path)
print("mirrored ok", value, reference)
# The recipe on one device (no --distribution); mirrored: TF_MIRRORED_CLI.
status, err = cli("single")
assert status == 0, err
"""
)

# The recipe mirrored over the two logical CPUs.
TF_MIRRORED_CLI = (
    TWO_LOGICAL_CPUS
    + COMMON
    + """
status, err = cli("mirrored", "--distribution", "mirrored")
assert status == 0, err
"""
)


def _env(backend, devices=None, **extra):
    """The environment of a child on `backend`; `devices`: that many JAX CPU
    devices, added to the XLA flags the test process has (conftest's
    compile settings)."""
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT, **extra)
    if devices is not None:
        flags = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
        env["XLA_FLAGS"] = flags.strip()
    env.pop("TF_CONFIG", None)
    return env


def _start(argv, env, log_path):
    """Starts `argv` with its output in `log_path`: a pipe read only at the
    end could fill while the test waits on another process, and stall it."""
    with open(log_path, "w") as log:
        return subprocess.Popen(
            argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True
        )


def _script(script, out_root, data):
    """The argv that runs `script` (COMMON's arguments: run folder, corpus, flags)."""
    return [
        sys.executable,
        "-c",
        textwrap.dedent(script),
        str(out_root),
        data,
        json.dumps(CLI_FLAGS),
    ]


def _finish(process, log_path):
    """Waits for `process`; its output, after checking that it exited 0."""
    process.wait(timeout=HANG_GUARD_S)
    output = open(log_path).read()
    assert process.returncode == 0, output[-6000:]
    return output


def _summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def _free_ports(n):
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.tensorflow_only
@pytest.mark.slow
def test_jax_sharded_and_multi_host_match_one_device(tmp_path, sample_text_path):
    """On four JAX devices, data and model parallel give the loss of one
    device, through the library and through the recipe; two JAX processes
    with two devices each (keras.distribution.initialize) train as the four."""
    four = tmp_path / "four"
    four.mkdir()
    sharded = _start(
        _script(JAX_SCRIPT, four, sample_text_path),
        _env("jax", devices=4),
        tmp_path / "four.log",
    )
    # Meanwhile: two processes, two devices each. --backend picks JAX although
    # the environment says TensorFlow (set before Keras loads).
    (port,) = _free_ports(1)
    two = tmp_path / "two"
    hosts = []
    for process_id in range(2):
        env = _env(
            "tensorflow",
            devices=2,
            KERAS_DISTRIBUTION_JOB_ADDRESSES=f"localhost:{port}",
            KERAS_DISTRIBUTION_NUM_PROCESSES="2",
            KERAS_DISTRIBUTION_PROCESS_ID=str(process_id),
        )
        command = [sys.executable, "-m", "keras_primer_cli.train", "--out", str(two)]
        command += ["--data", sample_text_path, *CLI_FLAGS, "--backend", "jax"]
        command += ["--distribution", "data_parallel", "--multi-host"]
        hosts.append(_start(command, env, tmp_path / f"host-{process_id}.log"))
    try:  # the hosts wait for each other: one failing must not leave the other
        for process_id, host in enumerate(hosts):
            _finish(host, tmp_path / f"host-{process_id}.log")
        output = _finish(sharded, tmp_path / "four.log")
    finally:
        for process in (*hosts, sharded):
            process.kill()
    assert "data_parallel ok" in output and "model_parallel ok" in output

    single = _summary(four / "single")
    assert single["backend"] == "jax"
    for kind in ("data_parallel", "model_parallel"):
        summary = _summary(four / kind)
        assert summary["distribution"] == kind and summary["steps"] == 4
        # Same batches, same seed: the same training run, sharded.
        assert summary["val_loss"] == pytest.approx(single["val_loss"], abs=2e-3), kind
        assert summary["samples"]["ROMEO:"].startswith("ROMEO:")  # 1 prompt on 4 devices
    # A batch that does not split over the devices is refused, with the fix.
    status, err = json.loads(output.strip().splitlines()[-1])["bad"]
    assert status == 2
    assert "Batch size 6 does not divide by the 4 batch shards" in err

    chief, other = _summary(two), _summary(two / "worker-1")
    assert chief["backend"] == "jax"
    data_parallel = _summary(four / "data_parallel")
    assert chief["val_loss"] == pytest.approx(data_parallel["val_loss"], abs=2e-3)
    assert other["val_loss"] == pytest.approx(chief["val_loss"], abs=1e-6)
    assert chief["samples"] == {}  # generation is refused across processes, with a note


@pytest.mark.tensorflow_only
@pytest.mark.slow
def test_tensorflow_mirrored_matches_one_device(tmp_path, sample_text_path):
    """Two logical CPUs under MirroredStrategy give the loss and, with
    clipping, the weights of one device, through the library and the recipe."""
    # One process per MirroredStrategy: a second one in a process reuses the
    # first one's collective instance keys.
    one = _start(
        _script(TF_SCRIPT, tmp_path, sample_text_path), _env("tensorflow"), tmp_path / "one.log"
    )
    two = _start(
        _script(TF_MIRRORED_CLI, tmp_path, sample_text_path),
        _env("tensorflow"),
        tmp_path / "mirrored.log",
    )
    try:
        assert "mirrored ok" in _finish(one, tmp_path / "one.log")
        _finish(two, tmp_path / "mirrored.log")
    finally:
        for process in (one, two):
            process.kill()
    summary = _summary(tmp_path / "mirrored")
    assert summary["distribution"] == "mirrored"
    assert summary["val_loss"] == pytest.approx(_summary(tmp_path / "single")["val_loss"], abs=2e-3)


@pytest.mark.tensorflow_only
def test_distribution_errors_name_the_backend():
    import keras

    from keras_primer.training.distribution import distribution_scope

    with pytest.raises(ValueError, match="Unknown distribution"):
        with distribution_scope("pipeline"):
            pass
    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(ValueError, match="needs the JAX backend; use `mirrored`"):
        with distribution_scope("data_parallel"):
            pass
