"""Mixed precision for both families (`MIXED_MODELS`), on every backend:
fit a step, cached greedy `generate` (against an uncached oracle), `score`,
and (TensorFlow pass, Feedback) an export of the mixed-precision `.keras` file, whose
SavedModel and ONNX Runtime text equals Keras' on the float32 copy.

Regression (issue 32): under a mixed policy on TensorFlow the Feedback
families' `generate` (so `keras-primer train --model feedback --precision
mixed_bfloat16` at its sample step) failed with `Mul` bfloat16 vs float32:
the prompt's prefill ran the stack's steps outside the autocast of `__call__`
and read the float32 variables as float32.
"""

import os

import keras
import numpy as np
import pytest
from export_helpers import keras_greedy, make_lm

from keras_primer_cli.model_registry import MODELS

# Both families and both activations: Primer EZ (squared ReLU), the
# Transformer (GELU), Feedback with Primer EZ's convolutions (its stack and
# memory; plain `feedback` is the same stack without the convolutions).
MIXED_MODELS = ["primer_ez", "transformer", "feedback_primer_ez"]
assert {MODELS[name].family for name in MIXED_MODELS} == {"primer", "feedback"}
PROMPTS = ["Hello", "To be"]
MAX_LENGTH = 16
# How far below the largest uncached logit a cached greedy token's logit may
# be: the cached steps and the whole-sequence pass round differently in 16
# bits (measured on these models: at most 0.25 in bfloat16, on JAX; 0.02 in
# float16). The logits span about [-5, 5]: a token from a wrong position or
# a wrong cache is far below the largest.
TOLERANCE = {"mixed_bfloat16": 0.4, "mixed_float16": 0.06}
POLICIES = [
    "mixed_bfloat16",
    pytest.param(
        "mixed_float16",
        marks=pytest.mark.skipif(
            keras.backend.backend() != "tensorflow",
            reason="float16 in the TensorFlow pass (the trainer offers bfloat16 on a JAX CPU)",
        ),
    ),
]


def _mixed_lm(model, policy):
    keras.config.set_dtype_policy(policy)  # conftest restores float32
    lm = make_lm(model, "bytes")
    assert lm.backbone.compute_dtype == policy.split("_")[1]
    assert {v.dtype for v in lm.backbone.weights} == {"float32"}
    return lm


def _generate_ids(lm):
    """Cached greedy `generate` on token ids: `(prompt_ids, output_ids)`."""
    preprocessor = lm.preprocessor
    inputs = preprocessor.generate_preprocess(PROMPTS, sequence_length=MAX_LENGTH)
    inputs = {k: keras.ops.convert_to_numpy(v) for k, v in inputs.items()}
    lm.preprocessor = None
    try:
        out = lm.generate(inputs, stop_token_ids=None)
    finally:
        lm.preprocessor = preprocessor
    return inputs, keras.ops.convert_to_numpy(out["token_ids"])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("model", MIXED_MODELS)
def test_mixed_precision_fit_generate_and_score(model, policy):
    lm = _mixed_lm(model, policy)
    lm.compile(optimizer=keras.optimizers.Adam(1e-3), sampler="greedy")
    history = lm.fit(
        ["Hello world.", "To be, or not to be."], batch_size=2, epochs=1, shuffle=False, verbose=0
    )
    assert np.isfinite(history.history["loss"]).all()

    texts = lm.generate(PROMPTS, max_length=MAX_LENGTH)
    assert texts == lm.generate(PROMPTS, max_length=MAX_LENGTH)
    assert all(t.startswith(p) and len(t) > len(p) for t, p in zip(texts, PROMPTS)), texts

    inputs, ids = _generate_ids(lm)
    np.testing.assert_array_equal(
        ids[inputs["padding_mask"].astype(bool)],
        inputs["token_ids"][inputs["padding_mask"].astype(bool)],
    )
    assert ids.min() >= 0 and ids.max() < lm.backbone.vocabulary_size
    # The uncached oracle: the whole generated sequence in one pass; every
    # generated token is its previous position's argmax, up to 16-bit rounding.
    logits = keras.ops.convert_to_numpy(
        keras.ops.cast(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}), "float32")
    )
    lengths = inputs["padding_mask"].sum(-1)
    exact = 0
    for row, length in enumerate(lengths):
        for t in range(int(length), MAX_LENGTH):
            previous = logits[row, t - 1]
            shortfall = previous.max() - previous[ids[row, t]]
            assert shortfall <= TOLERANCE[policy], (model, row, t, shortfall)
            exact += int(previous.argmax() == ids[row, t])
    generated = int(sum(MAX_LENGTH - lengths))
    assert exact >= generated - 2, (exact, generated)  # rounding flips ties only

    scores = keras.ops.convert_to_numpy(keras.ops.cast(lm.score(ids, np.ones_like(ids)), "float32"))
    np.testing.assert_allclose(scores, logits, atol=TOLERANCE[policy], rtol=0)
    losses = keras.ops.convert_to_numpy(
        lm.score(ids[:, :-1], scoring_mode="loss", target_ids=ids[:, 1:])
    )
    assert losses.shape == (2, MAX_LENGTH - 1) and np.isfinite(losses).all()


# The upcast on export (`load_float32`) does not depend on the family: the
# Feedback model, whose stack has the most state (every family's float32
# export: the parity matrix).
@pytest.mark.slow
@pytest.mark.tensorflow_only
@pytest.mark.parametrize("model", ["feedback"])
def test_mixed_precision_file_exports_the_float32_text(model, tmp_path):
    """`export_model` on a mixed_bfloat16 `.keras` file (after a step of
    training) upcasts it (`load_float32`); its SavedModel and ONNX Runtime
    give the float32 copy's Keras greedy text."""
    import tensorflow as tf

    from keras_primer.export import export_model
    from keras_primer.export.adapters import load_float32
    from keras_primer_runtime.ort_generator import OrtGenerator

    lm = _mixed_lm(model, "mixed_bfloat16")
    lm.compile(optimizer=keras.optimizers.Adam(1e-3), sampler="greedy")
    lm.fit(
        ["Hello world.", "To be, or not to be."], batch_size=2, epochs=1, shuffle=False, verbose=0
    )
    path = str(tmp_path / f"{model}.keras")
    lm.save(path)
    keras.config.set_dtype_policy("float32")
    new_tokens = 6
    reference = keras_greedy(load_float32(path), PROMPTS, new_tokens)
    written = export_model(path, str(tmp_path / "out"), name=model, max_new_tokens=new_tokens)
    served = tf.saved_model.load(written["saved_model"]).signatures["generate"](
        prompts=tf.constant(PROMPTS)
    )
    assert [x.decode("utf-8") for x in served["outputs"].numpy()] == reference
    onnx_dir = os.path.dirname(written["onnx"]["config"])
    generator = OrtGenerator(onnx_dir, providers=["CPUExecutionProvider"])
    assert generator.generate(PROMPTS, new_tokens) == reference
