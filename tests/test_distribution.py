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

COMMON = """
import numpy as np, keras
from keras_primer import PrimerBackbone, PrimerCausalLM, PrimerCausalLMPreprocessor, PrimerTokenizer

def build():
    keras.utils.set_random_seed(0)
    backbone = PrimerBackbone(vocabulary_size=256, num_layers=1, num_heads=2, hidden_dim=16,
                              intermediate_dim=32, max_sequence_length=16)
    lm = PrimerCausalLM(backbone, PrimerCausalLMPreprocessor(PrimerTokenizer(), sequence_length=16))
    lm.compile(optimizer=keras.optimizers.AdamW(1e-3), sampler="greedy", jit_compile=False)
    return lm

rng = np.random.default_rng(0)
ids = rng.integers(4, 256, size=(8, 16)).astype("int32")
x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
y = np.roll(ids, -1, axis=1)

def loss(lm):
    return keras.Model.evaluate(lm, x, y, batch_size=8, verbose=0, return_dict=True)["loss"]
"""

JAX_SCRIPT = COMMON + """
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

TF_SCRIPT = """
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
""" + COMMON + """
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
print("mirrored ok", value, reference)
"""


def _run(script, backend, extra_env=None):
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT, **(extra_env or {}))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
        text=True, timeout=300, cwd=ROOT,
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

    from keras_primer.training.distribution import distribution_scope, generate

    with pytest.raises(ValueError, match="Unknown distribution"):
        with distribution_scope("pipeline"):
            pass
    assert keras.backend.backend() == "tensorflow"
    with pytest.raises(ValueError, match="needs the JAX backend; use `mirrored`"):
        with distribution_scope("data_parallel"):
            pass
