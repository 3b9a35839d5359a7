"""Export-friendly helpers for fixed-shape decoding caches.

`keras.ops.slice_update` lowers to `XlaDynamicUpdateSlice` on TensorFlow, which
TF Serving (XLA off) and ONNX Runtime cannot run. The helpers here write rows
into a preallocated cache with comparisons, `where` and a matmul instead, which
every backend and both runtimes support.
"""

from keras import ops


def write_rows(cache, rows, start_index):
    """Returns `cache` with `rows` written at `start_index` along axis 1.

    Args:
        cache: `[batch, max_length, ...]` tensor.
        rows: `[batch, num_rows, ...]` tensor, `num_rows <= max_length`.
        start_index: Scalar int (tensor) where the first row goes.
    """
    max_length = ops.shape(cache)[1]
    rows = ops.cast(rows, cache.dtype)
    trailing = [1] * (len(cache.shape) - 2)
    positions = ops.arange(max_length, dtype="int32")
    start_index = ops.cast(start_index, "int32")
    if rows.shape[1] == 1:
        hit = ops.reshape(ops.equal(positions, start_index), [1, max_length] + trailing)
        return ops.where(hit, rows, cache)
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
