"""Layer-level oracles for squared ReLU, the causal depthwise conv and MDHA."""

import os

import keras
import numpy as np
import pytest
from keras import ops

from keras_primer.activations import squared_relu
from keras_primer.layers import CausalDepthwiseConv, FeedForward
from keras_primer.layers.causal_depthwise_conv import (
    FORMULATIONS,
    causal_depthwise_conv,
    conv_formulation,
)
from keras_primer.models.primer import MultiDConvHeadAttention, PrimerDecoderBlock


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x))


# --- squared ReLU -----------------------------------------------------------


def test_squared_relu_values_and_slope():
    x = np.array([-1.0, 0.0, 0.5, 2.0], "float32")
    np.testing.assert_allclose(to_np(squared_relu(x)), [0.0, 0.0, 0.25, 4.0])
    h = 1e-3
    slope = (to_np(squared_relu(x + h)) - to_np(squared_relu(x - h))) / (2 * h)
    np.testing.assert_allclose(slope[[0, 2, 3]], [0.0, 1.0, 4.0], atol=1e-2)


def test_squared_relu_by_name_survives_safe_mode_keras_file(tmp_path):
    model = keras.Sequential(
        [
            keras.Input((4,)),
            FeedForward(8, activation="squared_relu"),
            keras.layers.Dense(3, activation=squared_relu),
        ]
    )
    x = np.random.randn(2, 4).astype("float32")
    path = os.path.join(tmp_path, "m.keras")
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert restored.layers[0].get_config()["activation"] == "squared_relu"
    np.testing.assert_allclose(to_np(restored(x)), to_np(model(x)), atol=1e-6)


# --- exact GELU (the Transformer baseline) -----------------------------------


def test_exact_gelu_is_keras_gelu_written_with_erf(tmp_path):
    """`"gelu"` resolves to our erf-based exact GELU (issue 32: Keras' own is
    erfc-based on TensorFlow, which tf2onnx cannot export), equal to Keras'
    `gelu(approximate=False)` and to `x * Phi(x)` within float32 rounding, and
    a file written with it keeps the name."""
    from math import erf, sqrt

    from keras_primer.activations import gelu, get_activation, serialize_activation

    assert get_activation("gelu") is gelu and serialize_activation(gelu) == "gelu"
    x = np.concatenate([np.linspace(-12, 12, 4001), [-1e3, -40.0, 0.0, 1e3]]).astype("float32")
    ours = to_np(gelu(x)).astype("float64")
    exact = np.array([0.5 * v * (1 + erf(v / sqrt(2))) for v in x.astype("float64")])
    keras_gelu = to_np(keras.activations.gelu(x, approximate=False)).astype("float64")
    # A few float32 steps of max(|x|, 1) (measured: 2.1 for ours, 3.7 for
    # Keras' own on PyTorch, against the float64 value).
    ulp = np.spacing(np.maximum(np.abs(x), 1.0).astype("float32")).astype("float64")
    assert (np.abs(ours - exact) <= 4 * ulp).all()
    assert (np.abs(ours - keras_gelu) <= 8 * ulp).all()
    ffn = FeedForward(4, activation="gelu")
    assert ffn.activation is gelu and ffn.get_config()["activation"] == "gelu"
    model = keras.Sequential([keras.Input((3,)), ffn])
    path = os.path.join(tmp_path, "gelu.keras")
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert restored.layers[0].activation is gelu
    sample = np.random.default_rng(0).normal(size=(2, 3)).astype("float32")
    np.testing.assert_array_equal(to_np(restored(sample)), to_np(model(sample)))


def test_feed_forward_identity_weights_give_squared_hidden():
    ffn = FeedForward(4, activation="squared_relu", use_bias=False)
    ffn.build((1, 4))
    ffn.intermediate_dense.kernel.assign(np.eye(4, dtype="float32"))
    ffn.output_dense.kernel.assign(np.eye(4, dtype="float32"))
    x = np.array([[-2.0, -0.5, 0.5, 3.0]], "float32")
    np.testing.assert_allclose(to_np(ffn(x)), [[0.0, 0.0, 0.25, 9.0]], atol=1e-6)
    relu_ffn = FeedForward(4, activation="relu")
    relu_ffn.build((1, 4))
    assert relu_ffn.count_params() == ffn.count_params() + 8  # + the two biases


# --- causal depthwise convolution -------------------------------------------


def test_conv_tap_order():
    conv = CausalDepthwiseConv(kernel_size=3)
    x = np.arange(1, 6, dtype="float32").reshape(1, 5, 1, 1)
    conv.build(x.shape)
    conv.kernel.assign(np.array([100.0, 10.0, 1.0], "float32").reshape(3, 1, 1))
    np.testing.assert_allclose(to_np(conv(x)).ravel(), [1, 12, 123, 234, 345])


def test_conv_default_init_is_causal_smoother():
    conv = CausalDepthwiseConv(kernel_size=3)
    conv.build((1, 4, 2, 3))
    np.testing.assert_allclose(to_np(conv.kernel)[:, 1, 2], [1 / 6, 1 / 6, 0.5], atol=1e-7)


def test_conv_stepping_with_state_equals_full_sequence():
    conv = CausalDepthwiseConv(
        kernel_size=4,
        use_bias=True,
        bias_initializer="random_normal",
        kernel_initializer="random_normal",
    )
    x = np.random.randn(2, 7, 3, 2).astype("float32")
    full = to_np(conv(x))
    state = np.zeros((2, 3, 3, 2), "float32")
    # Prefill three rows, then single steps.
    out, state = conv(x[:, :3], state=state)
    pieces = [to_np(out)]
    for t in range(3, 7):
        out, state = conv(x[:, t : t + 1], state=state)
        pieces.append(to_np(out))
    np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=1e-6)
    # state_index picks the rows before a chosen position.
    _, mid_state = conv(x, state=np.zeros((2, 3, 3, 2), "float32"), state_index=5)
    np.testing.assert_allclose(to_np(mid_state), x[:, 2:5], atol=0)


def numpy_causal_conv(x, taps, history=None):
    """Loop oracle: `out[t] = sum_j taps[j] * x[t - size + 1 + j]` (zeros before 0)."""
    size = taps.shape[0]
    if history is None:
        history = np.zeros((x.shape[0], size - 1) + x.shape[2:], x.dtype)
    full = np.concatenate([history, x], axis=1)
    out = np.zeros(x.shape, "float64")
    for t in range(x.shape[1]):
        for j in range(size):
            out[:, t] += taps[j] * full[:, t + j]
    return out


def numpy_causal_conv_gradients(x, taps, weights, history=None):
    """Loop oracle of d sum(weights * conv(x)) / d (x, taps, history)."""
    size = taps.shape[0]
    if history is None:
        history = np.zeros((x.shape[0], size - 1) + x.shape[2:], x.dtype)
    full = np.concatenate([history, x], axis=1).astype("float64")
    full_grad = np.zeros(full.shape, "float64")
    tap_grads = np.zeros((size,) + x.shape[2:], "float64")
    for t in range(x.shape[1]):
        for j in range(size):
            full_grad[:, t + j] += taps[j] * weights[:, t]
            tap_grads[j] += (weights[:, t] * full[:, t + j]).sum(axis=0)
    broadcast = tuple(i for i in range(1, taps.ndim) if taps.shape[i] == 1)
    tap_grads = tap_grads.sum(axis=broadcast, keepdims=True)
    return full_grad[:, size - 1 :], tap_grads, full_grad[:, : size - 1]


def conv_gradients(formulation, arrays, weights, compiled):
    """The backend's d sum(weights * conv(x)) / d `arrays` (`(x, taps)` or
    `(x, taps, state)`), eagerly or compiled (`jax.jit`, TF under XLA)."""
    backend = keras.backend.backend()

    def loss(*args):
        out, _ = causal_depthwise_conv(
            *args[:2], state=args[2] if len(args) > 2 else None, formulation=formulation
        )
        return ops.sum(ops.convert_to_tensor(weights) * out)

    if backend == "jax":
        import jax

        grad = jax.grad(loss, argnums=tuple(range(len(arrays))))
        return [to_np(g) for g in (jax.jit(grad) if compiled else grad)(*arrays)]
    if backend == "tensorflow":
        import tensorflow as tf

        def grad(*args):
            with tf.GradientTape() as tape:
                tape.watch(args)
                value = loss(*args)
            return tape.gradient(value, args)

        if compiled:
            grad = tf.function(grad, jit_compile=True)
        return [to_np(g) for g in grad(*[tf.constant(a) for a in arrays])]
    import torch

    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    loss(*tensors).backward()
    return [to_np(t.grad) for t in tensors]


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("length", [1, 2, 9])
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_gradients_match_loop_oracle(formulation, length, with_state):
    """Every formulation's gradient (the hand-written one of `"shifted_grad"`
    included) equals the loop oracle's, for the inputs, the taps (summed over
    the axis they are broadcast on) and the decoding state; and so does its
    compiled gradient (`jax.jit`, TF under XLA) on JAX and TensorFlow."""
    rng = np.random.default_rng(10 + length)
    x = rng.standard_normal((2, length, 3, 4, 5)).astype("float32")
    taps = rng.standard_normal((3, 3, 1, 5)).astype("float32")
    weights = rng.standard_normal(x.shape).astype("float32")
    state = rng.standard_normal((2, 2, 3, 4, 5)).astype("float32") if with_state else None
    expected = numpy_causal_conv_gradients(x, taps, weights, state)
    arrays = (x, taps) if state is None else (x, taps, state)
    for compiled in [False] if keras.backend.backend() == "torch" else [False, True]:
        got = conv_gradients(formulation, arrays, weights, compiled)
        assert len(got) == len(arrays)
        for name, g, e in zip(("inputs", "taps", "state"), got, expected):
            np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("length", [1, 2, 9])
@pytest.mark.parametrize("with_state", [False, True])
def test_conv_formulations_match_loop_oracle(formulation, length, with_state):
    """Every formulation (each backend picks the faster one per runtime) computes
    the loop oracle's numbers, with and without a decoding state, for lengths
    shorter than, equal to and longer than the kernel's history."""
    rng = np.random.default_rng(length)
    x = rng.standard_normal((2, length, 3, 4, 5)).astype("float32")
    taps = rng.standard_normal((3, 3, 1, 5)).astype("float32")  # broadcast over heads
    bias = rng.standard_normal((3, 4, 5)).astype("float32")
    state = rng.standard_normal((2, 2, 3, 4, 5)).astype("float32") if with_state else None
    out, next_state = causal_depthwise_conv(x, taps, bias, state=state, formulation=formulation)
    expected = numpy_causal_conv(x, taps, state) + bias
    np.testing.assert_allclose(to_np(out), expected, rtol=1e-5, atol=1e-5)
    history = np.zeros((2, 2, 3, 4, 5), "float32") if state is None else state
    np.testing.assert_array_equal(to_np(next_state), np.concatenate([history, x], 1)[:, -2:])


def test_conv_formulation_choice_and_refusal():
    backend = keras.backend.backend()
    expected = {"tensorflow": "depthwise_op", "torch": "shifted_grad", "jax": "shifted"}
    assert conv_formulation() == expected[backend]
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=True)
        def under_xla():
            return tf.constant(conv_formulation() == "shifted")

        assert bool(under_xla())
    if backend == "torch":
        import torch

        @torch.compile(backend="eager", fullgraph=True)  # Dynamo's tracing alone
        def under_compile(x):
            return x + (1.0 if conv_formulation() == "shifted" else 0.0)

        assert float(under_compile(torch.zeros(()))) == 1.0
        torch._dynamo.reset()
    with pytest.raises(ValueError, match="formulation"):
        causal_depthwise_conv(np.ones((1, 2, 3), "float32"), np.ones((3, 3)), formulation="fft")


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch.compile: the PyTorch pass")
def test_mdha_is_not_compiled_again_at_every_call_under_torch_compile():
    """Keras' `jit_compile=True` on PyTorch is `torch.compile`. A call that
    changes global state (`keras.ops.pad` names a new Keras `Operation` at
    every call) fails Dynamo's guards at every step: the layer was compiled
    again each step, then ran eagerly past Dynamo's recompile limit."""
    import torch
    from torch._dynamo.utils import counters

    layer = MultiDConvHeadAttention(num_heads=2, key_dim=4, use_dconv=True)
    x = np.random.default_rng(0).random((2, 6, 8)).astype("float32")
    expected = to_np(layer(x))
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="eager")  # Dynamo's tracing alone: fast
    for _ in range(2):  # Keras' helpers meet new structures in the first calls
        compiled(x)
    frames = counters["frames"]["ok"]
    for _ in range(3):
        np.testing.assert_allclose(to_np(compiled(x)), expected, rtol=1e-6, atol=1e-6)
    assert counters["frames"]["ok"] == frames, "frames compiled again in later calls"
    torch._dynamo.reset()


def test_conv_rejects_bad_kernel_size_and_rank():
    with pytest.raises(ValueError, match="kernel_size"):
        CausalDepthwiseConv(kernel_size=0)
    with pytest.raises(ValueError, match="batch, time, heads, head_dim"):
        CausalDepthwiseConv().build((2, 5, 4))


# --- MDHA -------------------------------------------------------------------

BATCH, LENGTH, HIDDEN, HEADS = 2, 6, 8, 2
HEAD_DIM = HIDDEN // HEADS


def random_inputs(length=LENGTH, batch=BATCH):
    return np.random.randn(batch, length, HIDDEN).astype("float32")


def build_mdha(**kwargs):
    kwargs.setdefault("conv_kernel_initializer", "random_normal")
    layer = MultiDConvHeadAttention(
        num_heads=HEADS, key_dim=HEAD_DIM, bias_initializer="random_normal", **kwargs
    )
    layer.build((None, None, HIDDEN))
    return layer


def numpy_mdha(layer, x):
    """Slow reference: explicit loops over batch, heads, positions and taps."""
    w = {
        d.name: [to_np(v) for v in d.weights]
        for d in (layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense)
    }
    batch, length, _ = x.shape
    projections = []
    for i, name in enumerate(("query", "key", "value")):
        kernel, bias = w[name]
        p = np.einsum("btc,chd->bthd", x, kernel) + bias
        if layer.use_dconv:
            conv = layer.convs[i]
            taps = to_np(conv.kernel)
            if conv.share_across_heads:
                taps = np.broadcast_to(taps[:, None, :], (taps.shape[0], HEADS, HEAD_DIM))
            size = taps.shape[0]
            out = np.zeros_like(p)
            for t in range(length):
                for j in range(size):
                    source = t - (size - 1) + j
                    if source >= 0:
                        out[:, t] += taps[j] * p[:, source]
            if conv.bias is not None:
                out += to_np(conv.bias)
            p = out
        projections.append(p)
    q, k, v = projections
    result = np.zeros((batch, length, HEADS, HEAD_DIM), "float64")
    for b in range(batch):
        for h in range(HEADS):
            scores = q[b, :, h] @ k[b, :, h].T / np.sqrt(HEAD_DIM)
            scores = np.where(np.tril(np.ones((length, length))) > 0, scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            result[b, :, h] = probs @ v[b, :, h]
    kernel, bias = w["attention_output"]
    return np.einsum("bthd,hdc->btc", result, kernel) + bias


@pytest.mark.parametrize("shared", [False, True])
def test_mdha_matches_numpy_reference(shared):
    layer = build_mdha(share_conv_kernels_across_heads=shared, conv_bias=shared)
    x = random_inputs()
    np.testing.assert_allclose(to_np(layer(x)), numpy_mdha(layer, x), atol=1e-5)


@pytest.mark.parametrize("kernel_size", [1, 3])
def test_identity_kernels_equal_keras_multi_head_attention(kernel_size):
    layer = build_mdha(kernel_size=kernel_size)
    identity = np.zeros((kernel_size, HEADS, HEAD_DIM), "float32")
    identity[-1] = 1.0
    for conv in layer.convs:
        conv.kernel.assign(identity)
    reference = keras.layers.MultiHeadAttention(num_heads=HEADS, key_dim=HEAD_DIM)
    x = random_inputs()
    reference(x, x, use_causal_mask=True)
    for ours, theirs in zip(
        (layer.query_dense, layer.key_dense, layer.value_dense, layer.output_dense),
        (
            reference._query_dense,
            reference._key_dense,
            reference._value_dense,
            reference._output_dense,
        ),
    ):
        for a, b in zip(theirs.weights, ours.weights):
            a.assign(b)
    expected = to_np(reference(x, x, use_causal_mask=True))
    np.testing.assert_allclose(to_np(layer(x)), expected, atol=1e-5)


def test_heads_have_their_own_kernels_unless_shared():
    x = np.random.randn(1, 5, 1, 1).astype("float32")
    same_series = np.repeat(np.repeat(x, HEADS, axis=2), HEAD_DIM, axis=3)
    per_head = CausalDepthwiseConv(kernel_initializer="random_normal")
    shared = CausalDepthwiseConv(kernel_initializer="random_normal", share_across_heads=True)
    out_per_head = to_np(per_head(same_series))
    out_shared = to_np(shared(same_series))
    assert not np.allclose(out_per_head[:, :, 0], out_per_head[:, :, 1])
    np.testing.assert_allclose(out_shared[:, :, 0], out_shared[:, :, 1])


def test_conv_parameter_counts():
    hidden, heads = 32, 4
    head_dim = hidden // heads

    def conv_params(**kwargs):
        layer = MultiDConvHeadAttention(num_heads=heads, key_dim=head_dim, **kwargs)
        layer.build((None, None, hidden))
        return sum(c.count_params() for c in layer.convs)

    assert conv_params() == 9 * hidden  # paper: 3 taps x (heads x head_dim) x q, k, v
    assert (
        conv_params(share_conv_kernels_across_heads=True, conv_bias=True) == 12 * head_dim
    )  # labml-nn
    assert conv_params(use_dconv=False) == 0


def test_mdha_is_causal():
    layer = build_mdha()
    x = random_inputs(length=8)
    changed = x.copy()
    changed[:, 5:] = np.random.randn(*changed[:, 5:].shape)
    np.testing.assert_array_equal(to_np(layer(x))[:, :5], to_np(layer(changed))[:, :5])
    assert not np.allclose(to_np(layer(x))[:, 5:], to_np(layer(changed))[:, 5:])


def test_mdha_left_padding_matches_unpadded_row():
    layer = build_mdha()
    x = random_inputs(length=5, batch=1)
    padded = np.concatenate([np.random.randn(1, 3, HIDDEN).astype("float32"), x], axis=1)
    mask = np.array([[0, 0, 0, 1, 1, 1, 1, 1]], bool)
    out = to_np(layer(padded, padding_mask=mask))
    np.testing.assert_allclose(out[:, 3:], to_np(layer(x)), atol=1e-5)


def test_layer_configs_round_trip():
    x = random_inputs()
    for layer in (
        build_mdha(share_conv_kernels_across_heads=True, conv_bias=True, kernel_size=4),
        PrimerDecoderBlock(
            num_heads=HEADS, intermediate_dim=16, activation="gelu", use_dconv=False
        ),
        PrimerDecoderBlock(num_heads=HEADS, intermediate_dim=16),
    ):
        expected = to_np(layer(x))
        clone = layer.__class__.from_config(layer.get_config())
        clone(x)
        clone.set_weights(layer.get_weights())
        np.testing.assert_allclose(to_np(clone(x)), expected, atol=1e-6)
        assert clone.get_config() == layer.get_config()


def test_block_runs_in_mixed_bfloat16():
    block = PrimerDecoderBlock(num_heads=HEADS, intermediate_dim=16, dtype="mixed_bfloat16")
    out = block(random_inputs())
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert np.isfinite(to_np(ops.cast(out, "float32"))).all()
    assert keras.backend.standardize_dtype(block.attention.convs[0].kernel.dtype) == "float32"
