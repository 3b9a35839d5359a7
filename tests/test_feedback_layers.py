"""Feedback Transformer layers: numeric oracles on every backend."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_primer.activations import squared_relu
from keras_primer.models.feedback.feedback_attention import FeedbackAttention
from keras_primer.models.feedback.feedback_stack import FeedbackStack

BACKEND = keras.backend.backend()
HIDDEN, HEADS, FF, LAYERS, MAX_LEN = 16, 2, 24, 2, 12


def _np(x):
    x = ops.convert_to_numpy(x) if not isinstance(x, np.ndarray) else x
    return np.asarray(x, dtype="float64")


def _stack(shared_kv=True, memory_window=None, activation="relu", randomize=True, **kwargs):
    stack = FeedbackStack(
        num_layers=LAYERS,
        num_heads=HEADS,
        intermediate_dim=FF,
        max_sequence_length=MAX_LEN,
        activation=activation,
        shared_kv=shared_kv,
        memory_window=memory_window,
        **kwargs,
    )
    stack.build((None, None, HIDDEN))
    if randomize:
        # Non-zero relative tables, norms, biases and mixing weights, so every
        # term of the maths is exercised.
        rng = np.random.default_rng(1)
        for variable in stack.weights:
            if "seed" in variable.path:
                continue
            shape = tuple(variable.shape)
            scale = 0.2 if "kernel" not in variable.path else 0.25
            value = rng.normal(0.0, scale, shape)
            if "gamma" in variable.path:
                value += 1.0
            variable.assign(value.astype(variable.dtype))
    return stack


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + norm.epsilon) * _np(norm.gamma) + _np(norm.beta)


def _softmax(x, axis=-1):
    x = x - x.max(axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis, keepdims=True)


def _causal_conv(rows, kernel):
    """Causal depthwise conv along axis 1 of `rows` `[batch, n, ...]` with
    `kernel` `[K, ...]` (oldest tap first), zero history: the definition."""
    size = kernel.shape[0]
    out = np.zeros_like(rows)
    for t in range(rows.shape[1]):
        for i in range(size):
            if t - i >= 0:
                out[:, t] += kernel[size - 1 - i] * rows[:, t - i]
    return out


def reference_forward(stack, x):
    """Plain step-by-step NumPy reference with labml-nn's loop structure: a
    Python list of memory slots, keys/values re-projected from the stacked
    memory at every step and layer. With `use_dconv`, the keys/values of all
    slots so far and each layer's queries of all steps so far are convolved
    over time from scratch at every step. Returns (outputs, memory,
    layer_outputs)."""
    x = _np(x)
    batch, length, hidden = x.shape
    head_dim = stack.head_dim
    act = (
        (lambda u: np.maximum(u, 0) ** 2)
        if stack.activation is squared_relu
        else (lambda u: np.maximum(u, 0))
    )
    mixing = _softmax(_np(stack.layer_weights))
    wk, wv = _np(stack.key_dense.kernel), _np(stack.value_dense.kernel)
    vb = None if stack.value_dense.bias is None else _np(stack.value_dense.bias)
    use_dconv = getattr(stack, "use_dconv", False)
    if use_dconv:
        conv_shape = (stack.kernel_size, stack.kv_groups, stack.num_heads, head_dim)
        key_kernel = _np(stack.key_conv.kernel).reshape(conv_shape)
        value_kernel = _np(stack.value_conv.kernel).reshape(conv_shape)
    window = stack.memory_window or length + 1
    memory, outputs, per_layer = [], [], []
    raw_queries = [[] for _ in range(stack.num_layers)]
    for t in range(length):
        h = x[:, t]
        outs = [h]
        for i in range(stack.num_layers):
            attention = stack.attentions[i]
            starts = max(0, t - window)
            q = np.einsum(
                "bd,dhk->bhk",
                _layer_norm(h, stack.attention_norms[i]),
                _np(attention.query_dense.kernel),
            )
            if use_dconv:
                raw_queries[i].append(q)
                q = _causal_conv(np.stack(raw_queries[i], 1), _np(attention.query_conv.kernel))
                q = q[:, -1]
            if t > starts:
                mem = np.stack(memory, axis=1)  # [B, t, d]
                g = 0 if stack.shared_kv else i
                keys = np.einsum("bsd,dhk->bshk", mem, wk[:, g])
                values = np.einsum("bsd,dhk->bshk", mem, wv[:, g])
                if vb is not None:
                    values = values + vb[g]
                if use_dconv:
                    keys = _causal_conv(keys, key_kernel[:, g])
                    values = _causal_conv(values, value_kernel[:, g])
                keys, values = keys[:, starts:], values[:, starts:]
                rows = np.clip(t - np.arange(starts, t) - 1, 0, attention.max_relative_distance - 1)
                p = _np(attention.relative_key_embedding)[rows]
                s = _np(attention.relative_bias)[rows]
                scores = (
                    np.einsum("bhk,bshk->bhs", q + _np(attention.query_bias), keys)
                    + np.einsum("bhk,shk->bhs", q, p)
                    + s.T[None]
                ) / np.sqrt(head_dim)
                probs = _softmax(scores)
                attended = np.einsum("bhs,bshk->bhk", probs, values)
                h = (
                    h
                    + np.einsum("bhk,hkd->bd", attended, _np(attention.output_dense.kernel))
                    + _np(attention.output_dense.bias)
                )
            ffn = stack.feed_forwards[i]
            u = _layer_norm(h, stack.feed_forward_norms[i])
            u = act(u @ _np(ffn.intermediate_dense.kernel) + _np(ffn.intermediate_dense.bias))
            h = h + u @ _np(ffn.output_dense.kernel) + _np(ffn.output_dense.bias)
            outs.append(h)
        memory.append(sum(w * o for w, o in zip(mixing, outs)))
        outputs.append(h)
        per_layer.append(np.stack(outs, 1))
    return np.stack(outputs, 1), np.stack(memory, 1), np.stack(per_layer, 1)


def memory_via_cache(stack, x):
    """The memory slots, read from outside: with identity key projections the
    cached keys of step `t` are the memory slot `m_t` itself. Sets the key
    kernel (the reference must be computed afterwards)."""
    groups = stack.kv_groups
    eye = np.eye(HIDDEN, dtype="float32").reshape(HIDDEN, 1, HEADS, HIDDEN // HEADS)
    stack.key_dense.kernel.assign(np.repeat(eye, groups, axis=1))
    batch, length = x.shape[:2]
    _, cache = stack(x, cache=stack.empty_cache(batch, length), cache_update_index=0)
    return _np(cache["key"])[:, :, 0].reshape(batch, length, HIDDEN)


def _inputs(batch=2, length=7, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, length, HIDDEN)).astype("float32")


@pytest.mark.parametrize(
    "shared_kv,memory_window,activation",
    [(True, None, "relu"), (False, None, "squared_relu"), (True, 3, "squared_relu")],
)
def test_compiled_loop_equals_python_reference(shared_kv, memory_window, activation):
    stack = _stack(shared_kv, memory_window, activation)
    x = _inputs()
    outputs = stack(x)
    ref_out, _, _ = reference_forward(stack, x)
    np.testing.assert_allclose(_np(outputs), ref_out, atol=1e-5, rtol=1e-5)
    memory = memory_via_cache(stack, x)
    _, ref_mem, _ = reference_forward(stack, x)
    np.testing.assert_allclose(_np(outputs), ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(_np(memory), ref_mem, atol=1e-5, rtol=1e-5)


def test_compiled_loop_inside_jit_equals_reference():
    """The loop traced and compiled (jit / tf.function / torch eager)."""
    stack = _stack(shared_kv=False)
    x = _inputs()
    model = keras.Sequential([keras.Input((None, HIDDEN)), stack])
    outputs = model.predict(x, verbose=0)
    np.testing.assert_allclose(_np(outputs), reference_forward(stack, x)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chosen", [0, 1, LAYERS])
def test_one_hot_layer_weights_make_memory_the_chosen_layer_output(chosen):
    stack = _stack(shared_kv=chosen % 2 == 0)
    weights = np.full((LAYERS + 1,), -1e4, "float32")
    weights[chosen] = 1e4
    stack.layer_weights.assign(weights)
    x = _inputs()
    memory = memory_via_cache(stack, x)
    outputs = stack(x)
    _, _, per_layer = reference_forward(stack, x)
    np.testing.assert_allclose(memory, per_layer[:, :, chosen], atol=1e-5, rtol=1e-5)
    if chosen == 0:
        np.testing.assert_allclose(memory, _np(x), atol=1e-6)
    if chosen == LAYERS:
        np.testing.assert_allclose(memory, _np(outputs), atol=1e-6)


def test_mixing_weights_start_uniform():
    stack = _stack(randomize=False)
    np.testing.assert_allclose(_np(stack.mixing_weights()), np.full(LAYERS + 1, 1 / (LAYERS + 1)))


def test_step_zero_has_no_memory():
    stack = _stack()
    x = _inputs()
    before = _np(stack(x))
    rng = np.random.default_rng(5)
    for attention in stack.attentions:
        for variable in attention.weights:
            variable.assign(rng.normal(size=tuple(variable.shape)).astype("float32"))
    after = _np(stack(x))
    np.testing.assert_array_equal(after[:, 0], before[:, 0])
    assert np.abs(after[:, 1:] - before[:, 1:]).max() > 1e-3


@pytest.mark.parametrize("shared_kv", [True, False])
def test_causality(shared_kv):
    stack = _stack(shared_kv)
    x = _inputs(length=8)
    changed = x.copy()
    changed[:, 4:] = np.random.default_rng(3).normal(size=changed[:, 4:].shape)
    a, b = _np(stack(x)), _np(stack(changed))
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-3


def test_relative_bias_on_offset_one_attends_to_previous_step_only():
    attention = FeedbackAttention(num_heads=HEADS, key_dim=4, max_relative_distance=MAX_LEN)
    attention.build((None, HIDDEN))
    kernel = attention.query_dense.kernel
    kernel.assign(np.zeros(tuple(kernel.shape), "float32"))
    bias = np.zeros((MAX_LEN, HEADS), "float32")
    bias[0] = 1e4  # row 0 = offset 1, the newest memory slot
    attention.relative_bias.assign(bias)
    rng = np.random.default_rng(0)
    t = 5
    keys = rng.normal(size=(2, MAX_LEN, HEADS, 4)).astype("float32")
    values = rng.normal(size=(2, MAX_LEN, HEADS, 4)).astype("float32")
    offsets = t - np.arange(MAX_LEN)
    index = np.clip(offsets - 1, 0, MAX_LEN - 1).astype("int32")
    mask = np.broadcast_to(offsets >= 1, (2, MAX_LEN))
    query = rng.normal(size=(2, HIDDEN)).astype("float32")
    out = _np(attention(query, keys, values, index, mask))
    expected = np.einsum("bhk,hkd->bd", values[:, t - 1], _np(attention.output_dense.kernel))
    np.testing.assert_allclose(out, expected + _np(attention.output_dense.bias), atol=1e-5)


def test_per_layer_variant_with_tied_projections_equals_shared():
    shared = _stack(shared_kv=True)
    per_layer = _stack(shared_kv=False)
    by_name = {v.path.split("/", 1)[1]: v for v in per_layer.weights}
    for a in shared.weights:
        b = by_name.get(a.path.split("/", 1)[1])
        if b is not None and tuple(a.shape) == tuple(b.shape):
            b.assign(a.value)
    for name in ("key_dense", "value_dense"):
        tied = np.repeat(_np(getattr(shared, name).kernel), LAYERS, axis=1).astype("float32")
        getattr(per_layer, name).kernel.assign(tied)
    bias = per_layer.value_dense.bias
    bias.assign(np.zeros(tuple(bias.shape), "float32"))
    x = _inputs()
    np.testing.assert_allclose(_np(per_layer(x)), _np(shared(x)), atol=1e-5)


@pytest.mark.parametrize("shared_kv", [True, False])
def test_cached_steps_equal_full_forward(shared_kv):
    stack = _stack(shared_kv, memory_window=4)
    x = _inputs(length=7)
    full = _np(stack(x))
    cache = stack.empty_cache(2, MAX_LEN)
    pieces = []
    # Prefill 3 steps, then one step at a time, rewriting step 2 once as the
    # keras-hub generate loop does.
    out, cache = stack(x[:, :3], cache=cache, cache_update_index=0)
    pieces.append(_np(out))
    out, cache = stack(x[:, 2:3], cache=cache, cache_update_index=2)
    np.testing.assert_allclose(_np(out), full[:, 2:3], atol=1e-5)
    for t in range(3, 7):
        out, cache = stack(x[:, t : t + 1], cache=cache, cache_update_index=t)
        pieces.append(_np(out))
    np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=1e-5)
    assert tuple(cache["key"].shape) == (
        2,
        MAX_LEN,
        1 if shared_kv else LAYERS,
        HEADS,
        HIDDEN // HEADS,
    )


def _gradients(layer, x, loss_fn, training=None):
    """Gradients of `loss_fn(layer(x))` by variable path, and `"inputs"`."""
    variables = layer.trainable_variables
    if BACKEND == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = loss_fn(layer(x, training=training))
        *grads, x_grad = tape.gradient(loss, [v.value for v in variables] + [x])
    elif BACKEND == "torch":
        import torch

        for variable in variables:
            variable.value.grad = None  # .grad accumulates over calls
        x = torch.tensor(x, requires_grad=True)
        loss = loss_fn(layer(x, training=training))
        loss.backward()
        grads, x_grad = [v.value.grad for v in variables], x.grad
    else:
        import jax

        non_trainable = [v.value for v in layer.non_trainable_variables]

        def f(trainable, x):
            out, _ = layer.stateless_call(trainable, non_trainable, x, training=training)
            return loss_fn(out)

        grads, x_grad = jax.grad(f, argnums=(0, 1))([v.value for v in variables], x)
    grads = {v.path.split("/", 1)[1]: _np(g) for v, g in zip(variables, grads)}
    grads["inputs"] = _np(x_grad)
    return grads


@pytest.mark.parametrize("shared_kv", [True, False])
def test_gradients_reach_mixing_and_memory_projections(shared_kv):
    stack = _stack(shared_kv)
    x = _inputs(length=6)
    target = ops.convert_to_tensor(np.random.default_rng(2).normal(size=x.shape).astype("float32"))

    def loss_fn(out):
        return ops.mean(ops.square(out - target))

    grads = _gradients(stack, x, loss_fn)
    for name in ("layer_weights", "key/kernel", "value/kernel"):
        assert np.linalg.norm(grads[name]) > 1e-6, name
    # The layer-weight gradient matches a central finite difference.
    direction = np.random.default_rng(4).normal(size=LAYERS + 1)
    w0 = _np(stack.layer_weights)
    eps = 1e-2
    losses = []
    for sign in (1, -1):
        stack.layer_weights.assign((w0 + sign * eps * direction).astype("float32"))
        losses.append(float(_np(loss_fn(stack(x)))))
    numeric = (losses[0] - losses[1]) / (2 * eps)
    np.testing.assert_allclose(grads["layer_weights"] @ direction, numeric, rtol=3e-2, atol=1e-5)


def test_dropout_only_in_training():
    stack = _stack(dropout=0.5)
    x = _inputs()
    np.testing.assert_allclose(_np(stack(x)), reference_forward(stack, x)[0], atol=1e-5)
    assert np.abs(_np(stack(x, training=True)) - _np(stack(x))).max() > 1e-3


def test_mixed_precision_keeps_mixing_weights_float32():
    stack = _stack(dtype="mixed_bfloat16", randomize=False)
    out = stack(_inputs())
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(stack.layer_weights.dtype) == "float32"
    assert np.isfinite(_np(ops.cast(out, "float32"))).all()


def test_config_round_trip():
    stack = _stack(shared_kv=False, memory_window=5, activation="squared_relu")
    config = stack.get_config()
    assert config["activation"] == "squared_relu" and config["memory_window"] == 5
    clone = FeedbackStack.from_config(config)
    clone.build((None, None, HIDDEN))
    clone.set_weights(stack.get_weights())
    x = _inputs()
    np.testing.assert_array_equal(_np(clone(x)), _np(stack(x)))


def test_bad_memory_window():
    with pytest.raises(ValueError, match="memory_window"):
        FeedbackStack(
            num_layers=1, num_heads=2, intermediate_dim=8, max_sequence_length=8, memory_window=0
        )


def test_dropout_seed_follows_keras_global_seed():
    """`keras.utils.set_random_seed` (the training `--seed`) reaches the
    stack's dropout; a fixed SeedGenerator(0) would ignore it."""
    x = _inputs()

    def dropped(seed):
        keras.utils.set_random_seed(seed)
        return _np(_stack(dropout=0.5, randomize=False)(x, training=True))

    np.testing.assert_array_equal(dropped(1), dropped(1))
    assert np.abs(dropped(1) - dropped(2)).max() > 1e-3


def test_explicit_seed_is_in_config():
    stack = _stack(dropout=0.5, seed=7)
    assert FeedbackStack.from_config(stack.get_config()).seed == 7


class _Calling(keras.layers.Layer):
    """Calls `stack` through `__call__` (JAX's `stateless_call` of the stack
    itself would skip the input cast and autocast of mixed precision)."""

    def __init__(self, stack, padding_mask=None):
        super().__init__()
        self.stack = stack
        self.padding_mask = padding_mask
        self.built = True  # the stack is built

    def call(self, x, training=None):
        return self.stack(x, padding_mask=self.padding_mask, training=training)


@pytest.mark.parametrize(
    "shared_kv,memory_window,dropout,padded",
    [(True, None, 0.0, False), (False, 3, 0.5, True)],
)
def test_recomputing_backward_equals_differentiating_the_loop(
    shared_kv, memory_window, dropout, padded
):
    """The memory-light backward pass (JAX, TensorFlow) gives the gradients
    of differentiating the time loop directly, for every variable and the
    input (on PyTorch both runs take the direct path)."""
    stack = _stack(shared_kv, memory_window, "squared_relu", dropout=dropout, seed=3)
    x = _inputs(length=6)
    mask = np.ones((2, 6), "int32")
    if padded:
        mask[0, :2] = 0  # left padding
        mask[1, 4:] = 0  # right padding
    target = ops.convert_to_tensor(np.random.default_rng(2).normal(size=x.shape).astype("float32"))
    seed_state = _np(stack.seed_generator.state).astype("uint32")

    def loss_fn(out):
        return ops.mean(ops.square(out - target))

    layer = _Calling(stack, mask)
    runs = []
    for recompute in (False, True):
        stack.recompute_backward = recompute
        stack.seed_generator.state.assign(seed_state)
        runs.append(_gradients(layer, x, loss_fn, training=True))
    direct, recomputed = runs
    assert set(direct) == set(recomputed)
    for name, grad in direct.items():
        assert np.abs(grad).max() > 0 or "relative" in name, name
        # float32 rounding at the gradient's scale (TensorFlow's training
        # path runs the loops compiled by XLA, which reorders sums).
        atol = 1e-5 * np.abs(grad).max() + 1e-7
        np.testing.assert_allclose(recomputed[name], grad, rtol=1e-4, atol=atol, err_msg=name)


@pytest.mark.parametrize("training", [None, True])
def test_recomputing_backward_under_mixed_precision(training):
    """Under mixed_bfloat16 the recomputing backward pass is as close to the
    float32 gradients as differentiating the loop directly (bfloat16 alone
    is about 10% of each gradient's scale off here). training=True covers
    TensorFlow's XLA-compiled loops outside XLA, traced in the autocast scope."""
    x = _inputs(length=5)

    def loss_fn(out):
        return ops.mean(ops.square(ops.cast(out, "float32")))

    reference = _gradients(_Calling(_stack()), x, loss_fn, training=training)
    stack = _stack(dtype="mixed_bfloat16")
    errors = []
    for recompute in (False, True):
        stack.recompute_backward = recompute
        grads = _gradients(_Calling(stack), x, loss_fn, training=training)
        assert set(grads) == set(reference)
        for name, grad in grads.items():
            assert np.isfinite(grad).all(), name
        errors.append(
            max(
                np.abs(grads[n] - reference[n]).max() / (np.abs(reference[n]).max() + 1e-6)
                for n in reference
            )
        )
    direct, recomputed = errors
    assert direct < 0.25 and recomputed <= max(1.5 * direct, 0.02), errors
