"""MDHA inside the Feedback model (`use_dconv=True`): numeric oracles on every
backend, training and saving. Its export parity (shared and per-layer K/V) is
in the parity matrix, `test_generation_parity.py`."""

import keras
import numpy as np
import pytest
from keras import ops
from test_feedback_layers import HEADS, HIDDEN, LAYERS, MAX_LEN, _inputs, _np, _stack
from test_feedback_layers import reference_forward as stack_reference

from keras_primer.models.feedback import FeedbackBackbone, FeedbackCausalLM

VOCAB = 48
IDENTITY = np.array([0.0, 0.0, 1.0], "float32")  # oldest tap first: (1, 0, 0) in shift order


def _conv_variables(layer):
    return [v for v in layer.weights if v.path.endswith("conv/kernel")]


def _set_identity_kernels(layer):
    for variable in _conv_variables(layer):
        shape = tuple(variable.shape)
        variable.assign(np.broadcast_to(IDENTITY.reshape((3,) + (1,) * (len(shape) - 1)), shape))


@pytest.mark.parametrize(
    "shared_kv,memory_window,activation",
    [(True, None, "squared_relu"), (False, None, "relu"), (True, 3, "squared_relu")],
)
def test_stack_equals_reference(shared_kv, memory_window, activation):
    """The loop (conv applied once per slot, conv states carried) equals a
    reference that re-projects and re-convolves all slots at every step."""
    stack = _stack(shared_kv, memory_window, activation, use_dconv=True)
    x = _inputs()
    np.testing.assert_allclose(_np(stack(x)), stack_reference(stack, x)[0], atol=1e-5, rtol=1e-5)


def test_initial_kernels_are_primers_smoother():
    stack = _stack(shared_kv=False, randomize=False, use_dconv=True)
    variables = _conv_variables(stack)
    # A query conv per layer, one key and one value conv for the memory.
    assert len(variables) == LAYERS + 2
    for variable in variables:
        taps = _np(variable).reshape(3, -1)
        np.testing.assert_allclose(taps[:, 0], [1 / 6, 1 / 6, 0.5], rtol=1e-6)
        assert (taps == taps[:, :1]).all()
    assert tuple(stack.key_conv.kernel.shape) == (3, LAYERS * HEADS, HIDDEN // HEADS)


@pytest.mark.parametrize("shared_kv", [True, False])
def test_identity_kernel_equals_plain_feedback(shared_kv):
    conv = _stack(shared_kv, use_dconv=True)
    plain = _stack(shared_kv)
    by_path = {v.path.split("/", 1)[1]: v for v in conv.weights}
    for variable in plain.weights:
        if "seed" not in variable.path:
            by_path[variable.path.split("/", 1)[1]].assign(variable.value)
    _set_identity_kernels(conv)
    x = _inputs()
    np.testing.assert_allclose(_np(conv(x)), _np(plain(x)), atol=1e-6)


@pytest.mark.parametrize("shared_kv", [True, False])
def test_causality(shared_kv):
    stack = _stack(shared_kv, use_dconv=True)
    x = _inputs(length=8)
    changed = x.copy()
    changed[:, 4:] = np.random.default_rng(3).normal(size=changed[:, 4:].shape)
    a, b = _np(stack(x)), _np(stack(changed))
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-3


@pytest.mark.parametrize("shared_kv,prefill", [(True, 0), (False, 3), (True, 1)])
def test_cached_steps_equal_full_forward(shared_kv, prefill):
    stack = _stack(shared_kv, memory_window=4, use_dconv=True)
    x = _inputs(length=7)
    full = _np(stack(x))
    cache = stack.empty_cache(2, MAX_LEN)
    pieces = []
    if prefill:
        out, cache = stack(x[:, :prefill], cache=cache, cache_update_index=0)
        pieces.append(_np(out))
    for t in range(prefill, 7):
        out, cache = stack(x[:, t : t + 1], cache=cache, cache_update_index=t)
        pieces.append(_np(out))
    np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=1e-5)
    groups = 1 if shared_kv else LAYERS
    heads = (HEADS, HIDDEN // HEADS)
    assert {k: tuple(v.shape) for k, v in cache.items()} == {
        "key": (2, MAX_LEN, groups) + heads,
        "value": (2, MAX_LEN, groups) + heads,
        "query_conv": (2, LAYERS, 2) + heads,
        "key_conv": (2, 2, groups) + heads,
        "value_conv": (2, 2, groups) + heads,
    }


def test_kernel_size_one_has_no_conv_state():
    stack = _stack(use_dconv=True, kernel_size=1)
    assert set(stack.empty_cache(1, 4)) == {"key", "value"}
    x = _inputs()
    np.testing.assert_allclose(_np(stack(x)), stack_reference(stack, x)[0], atol=1e-5)


def test_mixed_precision():
    stack = _stack(dtype="mixed_bfloat16", randomize=False, use_dconv=True)
    out = stack(_inputs())
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(stack.key_conv.kernel.dtype) == "float32"
    assert np.isfinite(_np(ops.cast(out, "float32"))).all()


# === The causal LM ===


def _lm(shared_kv=True, **kwargs):
    backbone = FeedbackBackbone(
        vocabulary_size=VOCAB,
        num_layers=LAYERS,
        num_heads=HEADS,
        hidden_dim=HIDDEN,
        intermediate_dim=24,
        max_sequence_length=MAX_LEN,
        activation="squared_relu",
        shared_kv=shared_kv,
        use_dconv=True,
        **kwargs,
    )
    rng = np.random.default_rng(1)
    for variable in backbone.weights:
        if "seed" in variable.path or "gamma" in variable.path:
            continue
        scale = 0.3 if "embedding" in variable.path else 0.2
        value = rng.normal(0, scale, tuple(variable.shape))
        if variable.path.endswith("conv/kernel"):
            value += 0.5
        variable.assign(value.astype("float32"))
    return FeedbackCausalLM(backbone)


def _tokens(batch=2, length=MAX_LEN, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, length)).astype("int32")


def _batch(token_ids, padding_mask=None):
    if padding_mask is None:
        padding_mask = np.ones_like(token_ids)
    return {"token_ids": token_ids, "padding_mask": padding_mask}


@pytest.mark.parametrize("shared_kv,prefill", [(True, 0), (False, 5)])
def test_lm_cached_decoding_equals_full_forward(shared_kv, prefill):
    lm = _lm(shared_kv)
    token_ids = _tokens()
    full = _np(lm(_batch(token_ids)))
    start = 0
    if prefill:
        # The generate() path: a prefill loop of `prefill` tokens, then steps.
        hidden, cache = lm._build_cache(token_ids, prefill)
        logits = _np(lm.backbone.token_embedding(hidden, reverse=True))
        np.testing.assert_allclose(logits[:, :prefill], full[:, :prefill], atol=1e-5)
        start = prefill
    else:
        cache = lm.empty_cache(2, MAX_LEN)
    for t in range(start, MAX_LEN):
        logits, _, cache = lm.call_with_cache(token_ids[:, t : t + 1], cache, t)
        np.testing.assert_allclose(_np(logits)[:, 0], full[:, t], atol=1e-5)


def test_generate_greedy_equals_argmax_of_full_forward():
    lm = _lm()
    lm.compile(sampler="greedy")
    prompt_lengths = [3, 5]
    token_ids = np.zeros((2, MAX_LEN), "int32")
    padding_mask = np.zeros((2, MAX_LEN), "int32")
    prompts = _tokens(length=5, seed=3)
    for row, n in enumerate(prompt_lengths):
        token_ids[row, :n] = prompts[row, :n]
        padding_mask[row, :n] = 1
    out = lm.generate(_batch(token_ids, padding_mask), stop_token_ids=None)
    expected = token_ids.copy()
    for t in range(min(prompt_lengths), MAX_LEN):
        logits = lm.predict(_batch(expected), verbose=0)
        for row, n in enumerate(prompt_lengths):
            if t >= n:
                expected[row, t] = int(np.argmax(logits[row, t - 1]))
    np.testing.assert_array_equal(np.asarray(out["token_ids"]), expected)


def test_left_padding_equals_unpadded():
    """Padding steps enter the conv states as zeros, so a left-padded row
    equals the same tokens unpadded (positions are relative)."""
    backbone = _lm().backbone
    token_ids = _tokens()
    padded = np.concatenate([np.full((2, 3), 7, "int32"), token_ids[:, :9]], 1)
    mask = np.concatenate([np.zeros((2, 3), "int32"), np.ones((2, 9), "int32")], 1)
    out = _np(backbone(_batch(padded, mask)))
    ref = _np(backbone(_batch(token_ids[:, :9])))
    np.testing.assert_allclose(out[:, 3:], ref, atol=1e-5)


def test_state_specs_describe_empty_cache():
    lm = _lm(shared_kv=False)
    cache = lm.empty_cache(3, 7)
    specs = lm.decoding_state_specs()
    assert [s.path for s in specs] == [(name,) for name in cache]
    for spec in specs:
        assert tuple(cache[spec.path[0]].shape) == spec.concrete(3, 7)


def test_keras_file_round_trip(tmp_path):
    lm = _lm(shared_kv=False, kernel_size=2)
    config = lm.backbone.get_config()
    assert config["use_dconv"] is True and config["kernel_size"] == 2
    path = str(tmp_path / "lm.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.backbone.feedback_stack.use_dconv
    batch = _batch(_tokens())
    np.testing.assert_array_equal(_np(loaded(batch)), _np(lm(batch)))


def test_trains():
    lm = _lm()
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    token_ids = _tokens(batch=4, length=9, seed=4)
    x = _batch(token_ids[:, :-1])
    y = token_ids[:, 1:]
    before = [_np(v) for v in _conv_variables(lm)]
    history = lm.fit(x, y, batch_size=4, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    for old, variable in zip(before, _conv_variables(lm)):
        assert np.abs(_np(variable) - old).max() > 0, variable.path
