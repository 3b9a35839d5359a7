"""Many devices on CPU: JAX with 4 host devices, TensorFlow with 2 logical CPUs.

Device counts must be fixed before JAX/TensorFlow start, so each check runs
in a fresh subprocess (once, in the TensorFlow-backend pass).
"""

import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
# A hang guard only (many times a loaded 2-core machine's time): a test fails
# for a wrong result, never for a slow box (issue 20).
HANG_GUARD_S = 1800

COMMON = """
import numpy as np, keras
from keras_primer import PrimerBackbone, PrimerCausalLM, PrimerCausalLMPreprocessor, PrimerTokenizer

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
"""
)

TF_SCRIPT = (
    """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
"""
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
"""
)


def _run(script, backend, extra_env=None):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT, **(extra_env or {}))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout


@pytest.mark.tensorflow_only
@pytest.mark.slow
def test_jax_data_and_model_parallel_match_single_device():
    out = _run(JAX_SCRIPT, "jax", {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert "data_parallel ok" in out and "model_parallel ok" in out


@pytest.mark.tensorflow_only
@pytest.mark.slow
def test_tensorflow_mirrored_strategy_matches_single_device():
    assert "mirrored ok" in _run(TF_SCRIPT, "tensorflow")


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


# ----- `keras-primer train --distribution ...`: the whole recipe on many devices -----

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
    # --jit-compile stays auto: XLA on JAX (eager JAX compiles every op), graph
    # mode on TensorFlow's CPU.
    "--seed",
    "3",
]


@pytest.fixture(scope="module")
def small_corpus(sample_text_path):
    return sample_text_path


def _train_command(out, data, *flags):
    return [
        sys.executable,
        "-m",
        "keras_primer_runtime.train_cli",
        "--out",
        str(out),
        "--data",
        data,
        *CLI_FLAGS,
        *flags,
    ]


def _env(backend, **extra):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT, **extra)
    env.pop("TF_CONFIG", None)
    return env


def _cli_train(out, data, *flags, backend="jax", env=None):
    result = subprocess.run(
        _train_command(out, data, *flags),
        env=env or _env(backend),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return _summary(out)


def _summary(out):
    import json

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


def _run_together(commands_and_envs, timeout=HANG_GUARD_S):
    """Starts every process at once (they wait for each other) and checks all exit 0."""
    procs = [
        subprocess.Popen(
            cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for cmd, env in commands_and_envs
    ]
    try:
        outputs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stdout[-2000:] + stderr[-5000:]


@pytest.mark.tensorflow_only
@pytest.mark.slow
def test_cli_jax_sharded_and_multi_host_match_one_device(tmp_path, small_corpus):
    """The recipe on four JAX devices (data and model parallel) and on two
    JAX processes with two devices each (keras.distribution.initialize)
    trains the same model as on one device."""
    four_devices = _env("jax", XLA_FLAGS="--xla_force_host_platform_device_count=4")
    # --backend picks JAX although the environment says TensorFlow (set before Keras loads).
    single = _cli_train(tmp_path / "single", small_corpus, "--backend", "jax", backend="tensorflow")
    assert single["backend"] == "jax"
    sharded = {}
    for kind in ("data_parallel", "model_parallel"):
        sharded[kind] = summary = _cli_train(
            tmp_path / kind, small_corpus, "--distribution", kind, env=four_devices
        )
        assert summary["distribution"] == kind and summary["steps"] == 4
        # Same batches, same seed: the same training run, sharded.
        assert summary["val_loss"] == pytest.approx(single["val_loss"], abs=2e-3), kind
        assert summary["samples"]["ROMEO:"].startswith("ROMEO:")  # 1 prompt on 4 devices
    # A batch that does not split over the devices is refused, with the fix.
    result = subprocess.run(
        _train_command(
            tmp_path / "bad", small_corpus, "--distribution", "data_parallel", "--batch-size", "6"
        ),
        env=four_devices,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )
    assert result.returncode == 2
    assert "Batch size 6 does not divide by the 4 batch shards" in result.stderr

    # Two processes, two devices each, against the four-device run above.
    (port,) = _free_ports(1)
    out = tmp_path / "two"
    runs = []
    for process_id in range(2):
        env = _env(
            "jax",
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            KERAS_DISTRIBUTION_JOB_ADDRESSES=f"localhost:{port}",
            KERAS_DISTRIBUTION_NUM_PROCESSES="2",
            KERAS_DISTRIBUTION_PROCESS_ID=str(process_id),
        )
        command = _train_command(
            out, small_corpus, "--distribution", "data_parallel", "--multi-host"
        )
        runs.append((command, env))
    _run_together(runs)
    chief, other = _summary(out), _summary(out / "worker-1")
    assert chief["val_loss"] == pytest.approx(sharded["data_parallel"]["val_loss"], abs=2e-3)
    assert other["val_loss"] == pytest.approx(chief["val_loss"], abs=1e-6)
    assert chief["samples"] == {}  # generation is refused across processes, with a note


@pytest.mark.tensorflow_only
@pytest.mark.slow
def test_cli_tensorflow_mirrored_matches_one_device(tmp_path, small_corpus):
    single = _cli_train(tmp_path / "single", small_corpus, backend="tensorflow")
    # Two logical CPUs must exist before TensorFlow starts: set them up, then
    # run the command in the same process.
    script = textwrap.dedent(f"""
        import sys, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from keras_primer_runtime.train_cli import main
        sys.exit(main({_train_command(tmp_path / "mirrored", small_corpus, "--distribution", "mirrored")[3:]!r}))
    """)
    result = subprocess.run(
        [sys.executable, "-c", script],
        env=_env("tensorflow"),
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-5000:]
    summary = _summary(tmp_path / "mirrored")
    assert summary["distribution"] == "mirrored"
    assert summary["val_loss"] == pytest.approx(single["val_loss"], abs=2e-3)
