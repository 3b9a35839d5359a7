"""Feedback backbone and causal LM: cached decoding, training, saving, bad input."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_primer import (
    FeedbackBackbone,
    FeedbackCausalLM,
    FeedbackCausalLMPreprocessor,
    FeedbackTokenizer,
)
from keras_primer.activations import squared_relu

VOCAB, LAYERS, HIDDEN, MAX_LEN = 48, 2, 16, 12


def _np(x):
    return np.asarray(ops.convert_to_numpy(x), dtype="float64")


def _backbone(vocabulary_size=VOCAB, randomize=True, **kwargs):
    config = dict(
        vocabulary_size=vocabulary_size,
        num_layers=LAYERS,
        num_heads=2,
        hidden_dim=HIDDEN,
        intermediate_dim=24,
        max_sequence_length=MAX_LEN,
    )
    config.update(kwargs)
    backbone = FeedbackBackbone(**config)
    if randomize:
        # Non-trivial relative tables and mixing weights (they start at zero/one).
        rng = np.random.default_rng(1)
        for variable in backbone.weights:
            if "seed" in variable.path or "gamma" in variable.path:
                continue
            scale = 0.3 if "embedding" in variable.path else 0.2
            variable.assign(rng.normal(0, scale, tuple(variable.shape)).astype("float32"))
    return backbone


def _tokens(batch=2, length=MAX_LEN, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype("int32")


def _inputs(token_ids):
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


@pytest.mark.parametrize(
    "kwargs,prefill",
    [
        (dict(shared_kv=True), 0),
        (dict(shared_kv=False, memory_window=4, activation="squared_relu"), 5),
    ],
)
def test_cached_decoding_equals_full_forward(kwargs, prefill):
    lm = FeedbackCausalLM(_backbone(**kwargs))
    token_ids = _tokens()
    full = _np(lm(_inputs(token_ids)))
    start = 0
    if prefill:
        # The generate() path: a prefill loop of `prefill` tokens, then the
        # sampler recomputes position `prefill - 1` and steps on.
        hidden, cache = lm._build_cache(token_ids, prefill)
        logits = _np(lm.backbone.token_embedding(hidden, reverse=True))
        np.testing.assert_allclose(logits[:, :prefill], full[:, :prefill], atol=1e-5)
        start = prefill - 1
    else:
        cache = lm.empty_cache(2, MAX_LEN)
    for t in range(start, MAX_LEN):
        logits, _, cache = lm.call_with_cache(token_ids[:, t : t + 1], cache, t)
        np.testing.assert_allclose(_np(logits)[:, 0], full[:, t], atol=1e-5)
    keys = cache["key"]
    groups = 1 if kwargs["shared_kv"] else LAYERS
    assert tuple(keys.shape) == (2, MAX_LEN, groups, 2, HIDDEN // 2)


def test_generate_greedy_equals_argmax_of_full_forward():
    lm = FeedbackCausalLM(_backbone())
    lm.compile(sampler="greedy")
    prompt_lengths = [3, 5]
    token_ids = np.zeros((2, MAX_LEN), "int32")
    padding_mask = np.zeros((2, MAX_LEN), "int32")
    prompts = _tokens(length=5, seed=3)
    for row, n in enumerate(prompt_lengths):
        token_ids[row, :n] = prompts[row, :n]
        padding_mask[row, :n] = 1
    out = lm.generate({"token_ids": token_ids, "padding_mask": padding_mask}, stop_token_ids=None)
    generated = np.asarray(out["token_ids"])
    # Greedy decoding by the training-time forward: right padding does not
    # change earlier positions, so one fixed shape serves every step.
    expected = token_ids.copy()
    for t in range(min(prompt_lengths), MAX_LEN):
        logits = lm.predict(_inputs(expected), verbose=0)
        for row, n in enumerate(prompt_lengths):
            if t >= n:
                expected[row, t] = int(np.argmax(logits[row, t - 1]))
    np.testing.assert_array_equal(generated, expected)


def test_causality_and_left_padding():
    backbone = _backbone()
    token_ids = _tokens()
    changed = token_ids.copy()
    changed[:, 6:] = (changed[:, 6:] + 1) % VOCAB
    a, b = _np(backbone(_inputs(token_ids))), _np(backbone(_inputs(changed)))
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-4
    # A left-padded row equals the same tokens unpadded (relative positions).
    padded = np.concatenate([np.zeros((2, 3), "int32"), token_ids[:, :9]], 1)
    mask = np.concatenate([np.zeros((2, 3), "int32"), np.ones((2, 9), "int32")], 1)
    out = _np(backbone({"token_ids": padded, "padding_mask": mask}))
    ref = _np(backbone(_inputs(token_ids[:, :9])))
    np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5)


@pytest.mark.parametrize("shared_kv", [True, False])
def test_both_variants_train(shared_kv):
    lm = FeedbackCausalLM(_backbone(randomize=False, shared_kv=shared_kv))
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), weighted_metrics=[])
    rng = np.random.default_rng(0)
    pattern = np.array([5, 9, 11, 7, 5, 9, 11, 7, 5, 9, 11, 7, 5], "int32")
    starts = rng.integers(0, 4, 8)
    sequences = np.stack([np.roll(pattern, -s)[: MAX_LEN + 1] for s in starts])
    x = _inputs(sequences[:, :-1])
    y = sequences[:, 1:]
    losses = [float(lm.train_on_batch(x, y)) for _ in range(8)]
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="torch.compile: too slow here")
def test_jit_compiled_training_step_equals_default():
    """`jit_compile=True` (XLA on TensorFlow and JAX) trains the time loop and
    gives the default compile's loss and weights after two steps."""
    tokens = _tokens(batch=3, length=MAX_LEN + 1, seed=4)
    x, y = _inputs(tokens[:, :-1]), tokens[:, 1:]
    results = []
    for jit_compile in (False, True):
        keras.utils.set_random_seed(0)
        lm = FeedbackCausalLM(_backbone(randomize=False))
        lm.compile(
            optimizer=keras.optimizers.SGD(0.1), weighted_metrics=[], jit_compile=jit_compile
        )
        losses = [float(lm.train_on_batch(x, y)) for _ in range(2)]
        results.append((losses, [_np(w) for w in lm.trainable_weights]))
    (loss_default, weights_default), (loss_jit, weights_jit) = results
    np.testing.assert_allclose(loss_jit, loss_default, rtol=1e-4)
    for a, b in zip(weights_jit, weights_default):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's graph runtime")
def test_fit_at_width_256_in_tensorflow_default_compile():
    """`model.fit`'s compile on TensorFlow without XLA trains a model of width
    256 at batch 16: Grappler's memory optimizer once rewrote the time loop's
    gradient sums into temporary variables that collided across loop
    iterations (`AlreadyExistsError ... tmp_var` at the first step)."""
    keras.utils.set_random_seed(0)
    length, vocabulary = 64, 256
    lm = FeedbackCausalLM(
        _backbone(
            vocabulary,
            randomize=False,
            num_layers=4,
            num_heads=8,
            hidden_dim=256,
            intermediate_dim=1024,
            max_sequence_length=length,
        )
    )
    lm.compile(optimizer=keras.optimizers.Adam(1e-3))  # the default metrics, as users get them
    tokens = np.random.default_rng(0).integers(0, vocabulary, (16, length + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((16, length), bool)}
    y = tokens[:, 1:]
    losses = [float(lm.train_on_batch(x, y, return_dict=True)["loss"]) for _ in range(2)]
    assert np.isfinite(losses).all() and losses[1] < losses[0], losses


def test_evaluate_and_predict_equal_the_plain_forward_pass():
    """`evaluate` and `predict` trace the time loop XLA-compiled on TensorFlow
    (`compiled_time_loop`); they give the loss and logits of a direct call."""
    lm = FeedbackCausalLM(_backbone())
    lm.compile(weighted_metrics=[])
    tokens = _tokens(batch=4, length=MAX_LEN + 1, seed=5)
    x, y = _inputs(tokens[:, :-1]), tokens[:, 1:]
    logits = _np(lm(x, training=False))
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected_loss = -np.take_along_axis(log_probs, y[..., None], -1).mean()
    loss = lm.evaluate(x, y, batch_size=4, return_dict=True, verbose=0)["loss"]
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(lm.predict(x, batch_size=4, verbose=0), logits, atol=1e-5)


def test_bad_inputs_raise_clear_errors():
    backbone = _backbone(randomize=False)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        backbone(_inputs(np.full((1, 4), VOCAB, "int32")))
    with pytest.raises(ValueError, match="longer than the model's max_sequence_length"):
        backbone(_inputs(np.zeros((1, MAX_LEN + 1), "int32")))
    with pytest.raises(ValueError, match="rank 2"):
        backbone(
            {"token_ids": np.zeros((1, 2, 3), "int32"), "padding_mask": np.ones((1, 2), "int32")}
        )
    with pytest.raises(ValueError, match="integer token ids"):
        backbone(
            {"token_ids": np.zeros((1, 4), "float32"), "padding_mask": np.ones((1, 4), "int32")}
        )
    with pytest.raises(ValueError, match="padding_mask"):
        backbone({"token_ids": np.zeros((1, 4), "int32"), "padding_mask": np.ones((1, 5), "int32")})
    lm = FeedbackCausalLM(
        _backbone(vocabulary_size=256, randomize=False),
        FeedbackCausalLMPreprocessor(FeedbackTokenizer(), sequence_length=8),
    )
    with pytest.raises(ValueError, match="empty"):
        lm.generate("", max_length=8)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        lm.predict(_inputs(np.full((1, 4), 300, "int32")), verbose=0)
    with pytest.raises(ValueError, match="more than max_length"):
        lm.generate("x" * 20, max_length=8)


def test_keras_file_round_trip(tmp_path):
    lm = FeedbackCausalLM(_backbone(shared_kv=False, memory_window=5, activation="squared_relu"))
    path = os.path.join(tmp_path, "feedback.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, FeedbackCausalLM)
    stack = loaded.backbone.feedback_stack
    assert stack.activation is squared_relu and not stack.shared_kv and stack.memory_window == 5
    x = _inputs(_tokens())
    np.testing.assert_allclose(_np(loaded(x)), _np(lm(x)), atol=1e-6)


def test_preset_round_trip_and_string_generation(tmp_path):
    backbone = _backbone(vocabulary_size=256)
    preprocessor = FeedbackCausalLMPreprocessor(FeedbackTokenizer(), sequence_length=MAX_LEN)
    lm = FeedbackCausalLM(backbone, preprocessor)
    lm.compile(sampler="greedy")
    before = lm.generate(["ab", "xyz"], max_length=MAX_LEN)
    preset = os.path.join(tmp_path, "preset")
    lm.save_to_preset(preset)
    loaded = FeedbackCausalLM.from_preset(preset)
    assert isinstance(loaded.preprocessor, FeedbackCausalLMPreprocessor)
    assert isinstance(loaded.preprocessor.tokenizer, FeedbackTokenizer)
    loaded.compile(sampler="greedy")
    after = loaded.generate(["ab", "xyz"], max_length=MAX_LEN)
    assert before == after
    assert before[0].startswith("ab") and before[1].startswith("xyz")
    assert FeedbackBackbone.from_preset(preset).count_params() == backbone.count_params()
