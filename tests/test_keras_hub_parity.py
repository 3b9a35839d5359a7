"""keras-hub behaviours a user relies on (issue 13), each compared with what
keras-hub's GPT2 does, and input checks off the training path (issue 15)."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from keras import ops

import keras_primer  # noqa: F401
from keras_primer.activations import squared_relu
from keras_primer.models.feedback import (
    FeedbackBackbone,
    FeedbackCausalLM,
    FeedbackCausalLMPreprocessor,
)
from keras_primer.models.primer import (
    MultiDConvHeadAttention,
    PrimerBackbone,
    PrimerCausalLM,
    PrimerCausalLMPreprocessor,
    PrimerDecoderBlock,
)
from keras_primer.tokenizers import FeedbackTokenizer, PrimerTokenizer
from keras_primer.utils import validation

BACKEND = keras.backend.backend()
KWARGS = dict(
    vocabulary_size=256,
    num_layers=2,
    num_heads=2,
    hidden_dim=16,
    intermediate_dim=32,
    max_sequence_length=24,
)
FAMILIES = {
    "primer": (PrimerBackbone, PrimerCausalLM, PrimerCausalLMPreprocessor, PrimerTokenizer),
    "feedback": (
        FeedbackBackbone,
        FeedbackCausalLM,
        FeedbackCausalLMPreprocessor,
        FeedbackTokenizer,
    ),
}


def _lm(family, sequence_length=16, **overrides):
    backbone_cls, lm_cls, preprocessor_cls, tokenizer_cls = FAMILIES[family]
    backbone = backbone_cls(**dict(KWARGS, **overrides))
    preprocessor = preprocessor_cls(tokenizer_cls(), sequence_length=sequence_length)
    return lm_cls(backbone, preprocessor)


def _ids(batch=2, length=10, seed=0):
    return np.random.default_rng(seed).integers(3, 256, (batch, length)).astype("int32")


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), "float64")


# --- quantization of the tied embedding -----------------------------------

# Relative tolerance on the logits (max |difference| / max |logit|), measured
# on these tiny random models: int8 ~1%, int4 ~15%.
QUANT_TOLERANCE = {"int8": 0.05, "int4": 0.4}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_reaches_tied_embedding_and_generation_still_works(family, mode):
    lm = _lm(family)
    ids = _ids()
    reference = _np(lm.score(ids))
    lm.quantize(mode)
    embedding = lm.backbone.token_embedding
    assert embedding.quantization_mode == mode
    assert keras.backend.standardize_dtype(embedding._embeddings.dtype) == "int8"
    quantized = _np(lm.score(ids))
    error = np.abs(quantized - reference).max() / np.abs(reference).max()
    assert error < QUANT_TOLERANCE[mode], error
    lm.compile(sampler="greedy")
    out = lm.generate("ab", max_length=8)
    assert out.startswith("ab") and len(out.encode()) > 2


# --- LoRA -----------------------------------------------------------------


def _train_step_data(lm, n=4):
    """Preprocessed data; the preprocessor is detached so that fit and
    predict take the token-id dict as it is."""
    x, y, w = lm.preprocessor(["to be or not", "to be, that is"] * (n // 2))
    lm.preprocessor = None
    return x, y, w


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_trains_only_lora_weights_and_biases(family):
    lm = _lm(family, shared_kv=False) if family == "feedback" else _lm(family)
    lm.backbone.enable_lora(2)
    trainable = {v.path for v in lm.trainable_weights}
    assert trainable, "enable_lora left nothing to train"
    assert all(("lora" in p) or p.endswith("bias") for p in trainable), trainable
    assert any("query/lora" in p for p in trainable) and any("value/lora" in p for p in trainable)
    before = {v.path: _np(v) for v in lm.weights}
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    x, y, w = _train_step_data(lm)
    lm.fit(x, y, sample_weight=w, epochs=2, verbose=0)
    changed = {v.path for v in lm.weights if not np.array_equal(before[v.path], _np(v))}
    assert changed and changed <= trainable, changed - trainable
    assert any("lora_kernel_b" in p for p in changed)


# --- score ----------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_score_logits_and_per_token_loss(family):
    lm = _lm(family)
    ids = _ids()
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    logits = _np(lm.score(ids, padding_mask=mask))
    lm.preprocessor = None
    expected = lm.predict({"token_ids": ids, "padding_mask": mask}, verbose=0)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    targets = np.roll(ids, -1, axis=1)
    loss = _np(lm.score(ids, padding_mask=mask, scoring_mode="loss", target_ids=targets))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    manual = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    assert loss.shape == ids.shape
    np.testing.assert_allclose(loss, manual, atol=1e-4)
    with pytest.raises(ValueError, match="scoring_mode"):
        lm.score(ids, scoring_mode="probabilities")
    with pytest.raises(ValueError, match="target_ids"):
        lm.score(ids, scoring_mode="loss")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_score_layer_intercept(family):
    lm = _lm(family)
    ids = _ids()
    seen = []

    def record(x, index):
        seen.append((index, tuple(x.shape)))
        return x

    plain = _np(lm.score(ids, layer_intercept_fn=record))
    indices = [i for i, _ in seen]
    expected = [-1, 0, 1] if family == "primer" else [-1, 1]
    assert indices == expected
    assert all(shape == (2, 10, 16) for _, shape in seen)
    zeroed = _np(lm.score(ids, layer_intercept_fn=lambda x, i: x * 0 if i == -1 else x))
    assert np.abs(zeroed - plain).max() > 1e-4


# --- preset metadata, GPTQ structure ---------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_preset_metadata_names_keras_hub_task(family, tmp_path):
    lm = _lm(family)
    lm.save_to_preset(str(tmp_path))
    with open(tmp_path / "metadata.json") as f:
        metadata = json.load(f)
    # keras-hub's GPT2 writes ["CausalLM"] (its base class); we used to write
    # our private base class.
    assert metadata["tasks"] == ["CausalLM"]


def test_gptq_structure_includes_position_embedding():
    lm = _lm("primer")
    structure = lm.get_quantization_layer_structure("gptq")
    assert structure["sequential_blocks"] == lm.backbone.transformer_layers
    (embed,) = structure["pre_block_layers"]
    ids = _ids()
    backbone = lm.backbone
    tokens = _np(backbone.token_embedding(ids))
    with_positions = tokens + _np(backbone.position_embedding.embeddings)[None, : ids.shape[1]]
    np.testing.assert_allclose(_np(embed(ids)), with_positions, atol=1e-6)
    assert lm.get_quantization_layer_structure("int8") is None
    assert _lm("feedback").get_quantization_layer_structure("gptq") is None


# --- Keras masks ------------------------------------------------------------


@pytest.mark.parametrize("layer_cls", [MultiDConvHeadAttention, PrimerDecoderBlock])
def test_keras_mask_is_honoured(layer_cls):
    if layer_cls is MultiDConvHeadAttention:
        layer = layer_cls(num_heads=2, key_dim=4)
    else:
        layer = layer_cls(num_heads=2, intermediate_dim=16)
    ids = np.array([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]], "int32")  # 0 = padding
    embedding = keras.layers.Embedding(10, 8, mask_zero=True)
    embedded = embedding(ids)
    with_keras_mask = _np(layer(embedded))
    explicit = _np(layer(embedded, padding_mask=ids != 0))
    unmasked = _np(layer(ops.convert_to_tensor(_np(embedded).astype("float32"))))
    np.testing.assert_allclose(with_keras_mask, explicit, atol=1e-6)
    assert np.abs(with_keras_mask[0, 2:] - unmasked[0, 2:]).max() > 1e-4
    assert layer.compute_mask(embedded, embedding.compute_mask(ids)) is not None


# --- squared_relu by name ------------------------------------------------------


def test_squared_relu_by_name_in_keras_layers_survives_safe_mode_load(tmp_path):
    dense = keras.layers.Dense(4, activation="squared_relu")
    assert dense.activation is squared_relu
    model = keras.Sequential([keras.Input((3,)), dense])
    x = np.linspace(-1, 1, 6, dtype="float32").reshape(2, 3)
    path = str(tmp_path / "dense.keras")
    model.save(path)
    np.save(tmp_path / "expected.npy", _np(model(x)))
    script = (
        "import numpy as np, keras, keras_primer\n"
        f"m = keras.saving.load_model({path!r}, safe_mode=True)\n"
        "x = np.linspace(-1, 1, 6, dtype='float32').reshape(2, 3)\n"
        f"np.testing.assert_allclose(keras.ops.convert_to_numpy(m(x)), np.load({str(tmp_path / 'expected.npy')!r}), atol=1e-6)\n"
        "assert m.layers[0].activation is keras_primer.squared_relu\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env=dict(os.environ))


# --- loss over real tokens -----------------------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_default_loss_is_mean_over_real_tokens(family):
    lm = _lm(family, sequence_length=20)
    lm.compile(optimizer=keras.optimizers.SGD(0.0))
    # Very different lengths: lots of padding in the batch.
    texts = ["a", "to be or not to be", "hi", "the end"]
    history = lm.fit(texts, batch_size=4, epochs=1, verbose=0).history
    loss, perplexity = history["loss"][0], history["perplexity"][0]
    # Oracle: per-token cross-entropy by hand, averaged over real tokens only.
    x, y, weights = lm.preprocessor(texts)
    logits = ops.convert_to_numpy(lm(x)).astype("float64")
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    y, weights = ops.convert_to_numpy(y), ops.convert_to_numpy(weights).astype("float64")
    token_loss = -np.take_along_axis(log_probs, y[..., None], axis=-1)[..., 0]
    expected = (token_loss * weights).sum() / weights.sum()
    np.testing.assert_allclose(loss, expected, rtol=1e-4)
    np.testing.assert_allclose(np.exp(loss), perplexity, rtol=1e-4)


def test_perplexity_is_exp_loss_after_a_keras_file_round_trip(tmp_path):
    lm = _lm("primer", sequence_length=20)
    lm.compile(optimizer=keras.optimizers.SGD(0.0))
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    texts = ["to be or not to be", "hi"]
    for model in (lm, loaded):
        result = model.evaluate(texts, batch_size=2, verbose=0, return_dict=True)
        np.testing.assert_allclose(np.exp(result["loss"]), result["perplexity"], rtol=1e-5)
    # With metrics of the user's choosing there is no implicit perplexity.
    lm.compile(optimizer=keras.optimizers.SGD(0.0), weighted_metrics=[])
    assert "perplexity" not in lm.evaluate(texts, batch_size=2, verbose=0, return_dict=True)


# --- input checks off the training path -----------------------------------------


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_clear_errors_on_user_paths(family):
    lm = _lm(family)
    lm.compile()
    bad = _ids()
    bad[0, 3] = 300
    features = {"token_ids": bad, "padding_mask": np.ones_like(bad)}
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.backbone(features)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm(features)
    with pytest.raises(ValueError, match="max_length"):
        lm.generate("x" * 40, max_length=20)
    lm.preprocessor = None
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.fit(features, np.zeros_like(bad), verbose=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.predict(features, verbose=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.score(bad)
    long = _ids(length=KWARGS["max_sequence_length"] + 1)
    with pytest.raises(ValueError, match="max_sequence_length"):
        lm.backbone({"token_ids": long, "padding_mask": np.ones_like(long)})


def test_tokenizer_larger_than_vocabulary_is_refused():
    backbone = PrimerBackbone(**dict(KWARGS, vocabulary_size=100))
    with pytest.raises(ValueError, match="vocabulary_size"):
        PrimerCausalLM(backbone, PrimerCausalLMPreprocessor(PrimerTokenizer(), sequence_length=8))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_step_reads_no_token_values(family, monkeypatch):
    """The value check (a device-to-host copy on PyTorch) is not in the
    training step: `train_on_batch` never asks for the ids' values."""
    lm = _lm(family)
    lm.compile()
    x, y, w = _train_step_data(lm)
    x = {k: ops.convert_to_tensor(v) for k, v in x.items()}
    calls = []
    real = validation.concrete_value
    monkeypatch.setattr(validation, "concrete_value", lambda v: calls.append(1) or real(v))
    lm.train_on_batch(x, y, sample_weight=w)
    lm.train_on_batch(x, y, sample_weight=w)
    assert calls == []
