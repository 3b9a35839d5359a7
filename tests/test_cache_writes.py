"""Cache row writes: the fast form (dynamic update slice) against its
export-safe twin (one-hot `where`), cached decoding with both, and the
exporters tracing with the export-safe form."""

import os
import sys

import keras
import numpy as np
import pytest
from export_helpers import make_lm
from keras import ops

from keras_primer.layers import cache_utils
from keras_primer.layers.cache_utils import (
    export_safe_cache_writes,
    export_safe_cache_writes_active,
    write_rows,
    write_rows_export_safe,
    write_rows_fast,
)

sys.path.insert(  # the benchmarks' helpers (benchmarks/timing.py)
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
)
from timing import compile_plain  # noqa: E402

BACKEND = keras.backend.backend()
MAX_LEN = 12
# (number of rows, start): at the start, in the middle, ending at the last row.
WRITES = [(1, 0), (1, 5), (1, MAX_LEN - 1), (3, 0), (3, 4), (3, MAX_LEN - 3), (MAX_LEN, 0)]


def _np(x):
    return np.asarray(ops.convert_to_numpy(x))


def _data(num_rows, seed=0):
    rng = np.random.default_rng(seed)
    cache = rng.normal(size=(2, MAX_LEN, 3, 4)).astype("float32")
    rows = rng.normal(size=(2, num_rows, 3, 4)).astype("float32")
    return cache, rows


def _expected(cache, rows, start):
    out = cache.copy()
    out[:, start : start + rows.shape[1]] = rows
    return out


@pytest.mark.parametrize("num_rows,start", WRITES)
def test_fast_write_equals_export_safe_write_bitwise(num_rows, start):
    cache, rows = _data(num_rows, seed=num_rows * 100 + start)
    index = ops.convert_to_tensor(start, "int32")
    fast = _np(write_rows_fast(cache, rows, index))
    np.testing.assert_array_equal(fast, _expected(cache, rows, start))
    np.testing.assert_array_equal(fast, _np(write_rows_export_safe(cache, rows, index)))
    # A Python int start and the compiled function (tensor start) agree too.
    np.testing.assert_array_equal(_np(write_rows_fast(cache, rows, start)), fast)
    compiled = compile_plain(write_rows_fast)
    np.testing.assert_array_equal(_np(compiled(cache, rows, index)), fast)


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("num_rows,start", [(1, 7), (3, MAX_LEN - 3)])
def test_fast_write_runs_in_tf_function_without_xla(num_rows, start):
    # The Keras TF runtime without jit_compile (fit's "auto" fallback, eager
    # graphs) runs XlaDynamicUpdateSlice too.
    import tensorflow as tf

    cache, rows = _data(num_rows)
    plain = tf.function(write_rows_fast, jit_compile=False)
    out = plain(cache, rows, tf.constant(start))
    np.testing.assert_array_equal(_np(out), _expected(cache, rows, start))
    graph_ops = {
        op.type
        for op in plain.get_concrete_function(
            cache, rows, tf.constant(start)
        ).graph.get_operations()
    }
    assert "XlaDynamicUpdateSlice" in graph_ops


def _gradients(write, cache, rows, start, weights):
    """d sum(weights * write(cache, rows, start)) / d (cache, rows)."""

    def loss(c, r):
        return ops.sum(ops.convert_to_tensor(weights) * write(c, r, start))

    if BACKEND == "tensorflow":
        import tensorflow as tf

        c, r = tf.constant(cache), tf.constant(rows)
        with tf.GradientTape() as tape:
            tape.watch([c, r])
            value = loss(c, r)
        return [_np(g) for g in tape.gradient(value, [c, r])]
    if BACKEND == "jax":
        import jax

        return [_np(g) for g in jax.grad(loss, argnums=(0, 1))(cache, rows)]
    import torch

    c = torch.tensor(cache, requires_grad=True)
    r = torch.tensor(rows, requires_grad=True)
    loss(c, r).backward()
    return [_np(c.grad), _np(r.grad)]


@pytest.mark.parametrize("num_rows,start", [(1, 4), (3, MAX_LEN - 3)])
def test_fast_write_gradients_equal_export_safe_gradients(num_rows, start):
    # Feedback training writes its memory rows inside the loop being trained.
    cache, rows = _data(num_rows, seed=7)
    weights = np.random.default_rng(3).normal(size=cache.shape).astype("float32")
    index = ops.convert_to_tensor(start, "int32")
    fast = _gradients(write_rows_fast, cache, rows, index, weights)
    safe = _gradients(write_rows_export_safe, cache, rows, index, weights)
    expected_cache = weights.copy()
    expected_cache[:, start : start + num_rows] = 0
    np.testing.assert_array_equal(fast[0], expected_cache)
    np.testing.assert_array_equal(fast[1], weights[:, start : start + num_rows])
    for f, s in zip(fast, safe):
        np.testing.assert_array_equal(f, s)


@pytest.mark.tensorflow_only  # backend-independent: runs once
def test_context_switches_write_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(
        cache_utils, "write_rows_export_safe", lambda *a: calls.append("safe") or "safe"
    )
    monkeypatch.setattr(cache_utils, "write_rows_fast", lambda *a: calls.append("fast") or "fast")
    monkeypatch.setattr(cache_utils, "_tensorflow_graph_without_xla", lambda: False)
    assert not export_safe_cache_writes_active()
    assert write_rows(None, None, 0) == "fast"
    with export_safe_cache_writes():
        with export_safe_cache_writes():
            assert write_rows(None, None, 0) == "safe"
        assert export_safe_cache_writes_active()  # nesting keeps the outer block
        assert write_rows(None, None, 0) == "safe"
    assert not export_safe_cache_writes_active()
    assert write_rows(None, None, 0) == "fast"
    with pytest.raises(RuntimeError), export_safe_cache_writes():
        raise RuntimeError
    assert not export_safe_cache_writes_active()  # reset after an exception
    assert calls == ["fast", "safe", "safe", "fast"]


def _decode(lm, ids, prefill):
    """Logits of a prefill then one cached step per token, and the final cache."""
    cache = lm.empty_cache(ids.shape[0], ids.shape[1])
    pieces = []
    if prefill:
        logits, _, cache = lm.call_with_cache(ids[:, :prefill], cache, 0)
        pieces.append(_np(logits))
    for t in range(prefill, ids.shape[1]):
        logits, _, cache = lm.call_with_cache(ids[:, t : t + 1], cache, t)
        pieces.append(_np(logits))
    return np.concatenate(pieces, axis=1), {k: _np(v) for k, v in cache.items()}


@pytest.mark.parametrize("family,prefill", [("primer", 0), ("primer", 4), ("feedback", 0)])
def test_cached_decoding_fast_equals_full_and_export_safe(family, prefill):
    lm = make_lm(family)
    ids = np.random.default_rng(5).integers(0, 256, (2, 10)).astype("int32")
    full = _np(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    fast, fast_cache = _decode(lm, ids, prefill)
    with export_safe_cache_writes():
        safe, safe_cache = _decode(lm, ids, prefill)
    np.testing.assert_allclose(fast, full, atol=1e-4, rtol=1e-5)
    np.testing.assert_allclose(fast, safe, atol=1e-6, rtol=0)
    for name in fast_cache:
        np.testing.assert_allclose(fast_cache[name], safe_cache[name], atol=1e-6, rtol=0)


def _graph_op_types(concrete_function):
    graph_def = concrete_function.graph.as_graph_def()
    types = {node.op for node in graph_def.node}
    for function in graph_def.library.function:
        types |= {node.op for node in function.node_def}
    return types


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("family", ["primer", "feedback"])
def test_exporters_trace_without_xla_dynamic_update_slice(family):
    import tensorflow as tf

    from keras_primer.export import onnx_export, saved_model

    lm = make_lm(family)
    # Control: the decoding step traced for XLA outside the exporters writes
    # with XlaDynamicUpdateSlice, so the checks below can fail.
    adapter, _, (step_fn, step_signature, _) = onnx_export.build_functions(lm)
    plain = tf.function(
        lambda ids, state, i: adapter.step(ids, state, i), autograph=False, jit_compile=True
    )
    state = adapter.empty_state(1, 8)
    control = plain.get_concrete_function(
        tf.TensorSpec([1, 1], tf.int32), state, tf.TensorSpec([], tf.int32)
    )
    assert "XlaDynamicUpdateSlice" in _graph_op_types(control)

    onnx_step = _graph_op_types(step_fn.get_concrete_function(*step_signature))
    _, signatures, _ = saved_model.build_module(lm, default_max_new_tokens=4)
    generate = _graph_op_types(signatures["generate"])
    for types in (onnx_step, generate):
        assert not {t for t in types if t.startswith("Xla")}
    # The export-safe form did the writing: a select over the cache rows.
    assert {"SelectV2"} <= onnx_step and {"SelectV2"} <= generate


@pytest.mark.tensorflow_only
def test_tensorflow_uses_the_fast_form_only_under_xla():
    """TensorFlow graphs that XLA will not compile (`fit` on a CPU, and what
    `model.export` traces) get the export-safe form; XLA graphs the fast one."""
    import tensorflow as tf

    cache = np.zeros((2, 6, 3), "float32")
    rows = np.ones((2, 1, 3), "float32")
    spec = (tf.TensorSpec(cache.shape), tf.TensorSpec(rows.shape), tf.TensorSpec([], tf.int32))
    for jit_compile, expected in ((False, "SelectV2"), (True, "XlaDynamicUpdateSlice")):
        fn = tf.function(write_rows, jit_compile=jit_compile, autograph=False)
        types = _graph_op_types(fn.get_concrete_function(*spec))
        assert expected in types, (jit_compile, sorted(types))
        assert ("XlaDynamicUpdateSlice" in types) == jit_compile
        np.testing.assert_array_equal(_np(fn(cache, rows, tf.constant(4)))[:, 4], rows[:, 0])
