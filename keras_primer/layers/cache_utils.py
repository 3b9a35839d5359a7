"""Helpers for decoding caches: fixed-shape buffers, and the growing past of exports.

Keras `generate` preallocates each cache for the whole sequence. Writing rows
into such a buffer has two forms:

* the fast form: a dynamic update slice, which computes only the rows
  written (at most one plain copy of the cache besides), with the cheapest op
  each backend has: `jax.lax.dynamic_update_slice` on JAX,
  `XlaDynamicUpdateSlice` on TensorFlow (TF registers no gradient for it, so
  a custom one is attached here), `Tensor.index_copy` on PyTorch (Keras'
  `slice_update` builds a full index grid there; several times slower in a
  CPU micro-benchmark).
* the export-safe form: comparisons, `where` and a one-hot matmul over the
  whole cache, which reads and writes the full cache for every token.

TF Serving without XLA and ONNX Runtime (tf2onnx has no handler) cannot run
`XlaDynamicUpdateSlice`. So `write_rows` takes the fast form on JAX, PyTorch
and TensorFlow code that XLA compiles (`jit_compile=True`), and the
export-safe form in TensorFlow code that XLA does not compile (eager, `fit`
on a CPU, any SavedModel traced from it, `model.export` included) and inside
`export_safe_cache_writes()`, which our exporters enter while they trace.

Both forms give bitwise-equal results for finite rows that fit in the cache
(the multi-row one-hot matmul adds exact zeros; there a `-0.0` becomes
`+0.0`, and an inf/NaN in one row turns the other written rows NaN). Rows
that do not fit are undefined: XLA clamps the start, PyTorch raises, the
one-hot form drops them. Out-of-place runtimes still copy the whole cache
into the result; XLA updates in place where it can (loop-carried buffers).

The exported decoding step (ONNX Runtime, the SavedModel's loop) runs in a
third form, inside `growing_cache_writes()`: a cache holds exactly the rows
of the positions before the step, and a write appends (`concatenate`), as
Hugging Face Optimum's decoder-with-past does (`present = concat(past,
new)`). A step then reads and copies the tokens so far, not a buffer sized
for the longest request: its cost grows with the position, not with
`max_length` or `max_sequence_length`.
"""

import keras
from keras import ops

from keras_primer.utils.tracing import TraceFlag, in_tensorflow_xla_context

_export_safe = TraceFlag()
_growing = TraceFlag()


def export_safe_cache_writes():
    """Makes `write_rows` use the export-safe form while the block runs.

    Wrap the tracing of functions that go to TF Serving or ONNX (the flag is
    read while tracing; a traced graph keeps the form it was traced with).
    Nests; thread-local, as tracing happens on the calling thread.
    """
    return _export_safe.on()


def export_safe_cache_writes_active() -> bool:
    """True inside `export_safe_cache_writes()` (on this thread)."""
    return _export_safe.active


def growing_cache_writes():
    """Makes `write_rows` append while the block runs: each cache holds
    exactly the rows before the position written (the exported decoding
    step's past). Read while tracing; nests; thread-local."""
    return _growing.on()


def fixed_cache_writes():
    """Inside `growing_cache_writes()`, a block whose caches are fixed-shape
    buffers again (a time loop that carries a buffer through its steps)."""
    return _growing.off()


def growing_cache_writes_active() -> bool:
    """True inside `growing_cache_writes()` (on this thread)."""
    return _growing.active


def grow_rows(cache, num_rows):
    """`cache` with `num_rows` zero rows appended along axis 1."""
    shape = ops.shape(cache)
    zeros = ops.zeros((shape[0], num_rows) + tuple(shape[2:]), dtype=cache.dtype)
    return ops.concatenate([cache, zeros], axis=1)


def write_rows(cache, rows, start_index, axis=1):
    """Returns `cache` with `rows` written at `start_index` along `axis`.

    Uses the fast form, or the export-safe form inside
    `export_safe_cache_writes()` and in TensorFlow code that XLA does not
    compile; inside `growing_cache_writes()` it appends (see the module
    docstring).

    Args:
        cache: A tensor with one row per position along `axis` (`max_length`
            rows; growing: the `start_index` rows before).
        rows: The same shape but `num_rows` along `axis`; `start_index +
            num_rows <= max_length`.
        start_index: Scalar int (tensor) where the first row goes.
        axis: The position axis (1: `[batch, length, ...]`; 2: the
            heads-first `[batch, heads, length, head_dim]`).
    """
    if _growing.active:
        return ops.concatenate([cache, ops.cast(rows, cache.dtype)], axis=axis)
    if export_safe_cache_writes_active() or _tensorflow_graph_without_xla():
        return write_rows_export_safe(cache, rows, start_index, axis)
    return write_rows_fast(cache, rows, start_index, axis)


def _tensorflow_graph_without_xla() -> bool:
    """TensorFlow code that XLA will not compile: eager, `model.fit` on a CPU
    (XLA off), and any SavedModel traced from it (`model.export` included),
    which TF Serving may run without XLA kernels. The fast form buys little
    there: Feedback training ran at 1/11.9 of the Transformer with the
    export-safe form and 1/13.0 with the fast one (two benchmark runs)."""
    return keras.backend.backend() == "tensorflow" and not in_tensorflow_xla_context()


def write_rows_fast(cache, rows, start_index, axis=1):
    """`write_rows` with a dynamic update slice: copies only the written rows
    (plus the output buffer where the runtime cannot update in place)."""
    backend = keras.backend.backend()
    cache = ops.convert_to_tensor(cache)
    rows = ops.cast(rows, cache.dtype)
    if backend == "tensorflow":
        return _tf_write_rows(cache, rows, ops.cast(start_index, "int32"), axis)
    if backend == "torch":
        import torch

        start = torch.as_tensor(start_index, device=cache.device).to(torch.int64)
        index = torch.arange(rows.shape[axis], device=cache.device, dtype=torch.int64) + start
        return cache.index_copy(axis, index, rows)
    start = ops.cast(start_index, "int32")
    zero = ops.zeros((), "int32")
    starts = [zero] * len(cache.shape)
    starts[axis] = start
    return ops.slice_update(cache, starts, rows)


def _tf_write_rows(cache, rows, start, axis):
    import tensorflow as tf
    from tensorflow.compiler.tf2xla.python import xla

    @tf.custom_gradient
    def write(cache, rows):
        begin = [0] * len(cache.shape)
        begin[axis] = start
        begin = tf.stack(begin)
        written = xla.dynamic_update_slice(cache, rows, begin)

        def grad(upstream):
            # The written rows shadow the cache there; the rows get their slice.
            cache_grad = xla.dynamic_update_slice(upstream, tf.zeros_like(rows), begin)
            return cache_grad, tf.slice(upstream, begin, tf.shape(rows))

        return written, grad

    return write(cache, rows)


def write_rows_export_safe(cache, rows, start_index, axis=1):
    """`write_rows` with comparisons, `where` and a one-hot matmul only: core
    TF ops that TF Serving (no XLA) and tf2onnx take, at the price of touching
    every cache row."""
    rows = ops.cast(rows, cache.dtype)
    rank = len(cache.shape)
    max_length = ops.shape(cache)[axis]
    positions = ops.arange(max_length, dtype="int32")
    start_index = ops.cast(start_index, "int32")
    if rows.shape[axis] == 1:
        hit_shape = [1] * axis + [max_length] + [1] * (rank - axis - 1)
        hit = ops.reshape(ops.equal(positions, start_index), hit_shape)
        return ops.where(hit, rows, cache)
    if axis != 1:  # the one-hot matmul below writes along axis 1
        moved = write_rows_export_safe(
            ops.moveaxis(cache, axis, 1), ops.moveaxis(rows, axis, 1), start_index
        )
        return ops.moveaxis(moved, 1, axis)
    trailing = [1] * (rank - 2)
    num_rows = ops.shape(rows)[1]
    targets = ops.arange(num_rows, dtype="int32") + start_index
    one_hot = ops.cast(ops.equal(targets[:, None], positions[None, :]), cache.dtype)
    flat_rows = ops.reshape(rows, [ops.shape(rows)[0], num_rows, -1])
    scattered = ops.einsum("nt,bnc->btc", one_hot, flat_rows)
    scattered = ops.reshape(scattered, ops.shape(cache))
    hit = ops.reshape(ops.sum(one_hot, axis=0) > 0, [1, max_length] + trailing)
    return ops.where(hit, scattered, cache)


def causal_attention_mask(query_length, key_length, query_start=0, key_padding_mask=None):
    """Boolean `[batch or 1, 1, query_length, key_length]` mask, True = attend.

    Query `i` sits at absolute position `query_start + i` and may attend to keys
    at positions `<= query_start + i` that are not padding. A query always
    attends to its own position, so a padding query gets finite (ignored)
    outputs rather than NaNs from an all-masked row.
    """
    query_positions = ops.arange(query_length, dtype="int32") + ops.cast(query_start, "int32")
    key_positions = ops.arange(key_length, dtype="int32")
    causal = ops.less_equal(key_positions[None, :], query_positions[:, None])
    mask = causal[None, None]
    if key_padding_mask is not None:
        keys_valid = ops.cast(key_padding_mask, "bool")[:, None, None, :]
        own = ops.equal(key_positions[None, :], query_positions[:, None])[None, None]
        mask = ops.logical_and(mask, ops.logical_or(keys_valid, own))
    return mask


def position_ids_from_mask(padding_mask):
    """Positions that skip padding: `cumsum(mask) - 1`, 0 at leading pads.

    A left-padded row then gets the same positions as the row unpadded; for
    right padding (or no padding) the result is `0, 1, 2, ...`.
    """
    counts = ops.cumsum(ops.cast(padding_mask, "int32"), axis=1)
    return ops.maximum(counts - 1, 0)
