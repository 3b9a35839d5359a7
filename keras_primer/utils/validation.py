"""Input checks that turn bad model inputs into clear `ValueError`s.

JAX clamps out-of-range embedding lookups silently, so token ids are checked
in Python wherever their values are already on the host (NumPy inputs to a
model call, to `fit`/`predict`/`evaluate` and `score`, `generate`'s prompts).
Inside a model's `call` only the static checks (dtype, rank, length) apply:
reading id values there would cost a device-to-host sync every training step
on PyTorch (and is impossible while tracing on JAX/TensorFlow).
"""

import keras
import numpy as np


def concrete_value(x):
    """`x` as a NumPy array when its values are known now, else None."""
    if x is None or keras.backend.is_keras_tensor(x):
        return None
    if isinstance(x, (np.ndarray, list, tuple, int)):
        return np.asarray(x)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            # Multi-host: this process holds only its own rows; check those.
            return np.concatenate([np.asarray(s.data) for s in x.addressable_shards])
    elif backend == "tensorflow":
        import tensorflow as tf

        if not tf.executing_eagerly() or not hasattr(x, "numpy"):
            return None
    elif backend == "torch":
        import torch

        if torch.compiler.is_compiling():
            return None
    return np.asarray(keras.ops.convert_to_numpy(x))


def _dtype_name(x) -> str:
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        return np.asarray(x).dtype.name
    return keras.backend.standardize_dtype(dtype)


def check_token_ids(
    token_ids,
    vocabulary_size: int,
    max_sequence_length: int | None,
    name: str = "token_ids",
    check_values: bool = True,
) -> None:
    """Raises ValueError unless `token_ids` is an int `[batch, length]` input
    with values in `[0, vocabulary_size)` and length `<= max_sequence_length`.

    `check_values=False` checks only dtype, rank and length (no device sync);
    with True the values are checked when they are known now (see
    `concrete_value`).
    """
    dtype = _dtype_name(token_ids)
    if "int" not in dtype:
        raise ValueError(
            f"`{name}` must hold integer token ids (int32 or int64). "
            f"Received dtype {dtype}. Tokenize text with the model's "
            "preprocessor or tokenizer first."
        )
    shape = tuple(getattr(token_ids, "shape", np.shape(token_ids)))
    if len(shape) != 2:
        raise ValueError(
            f"`{name}` must have shape [batch, length] (rank 2). "
            f"Received shape {shape} (rank {len(shape)})."
        )
    length = shape[1]
    if max_sequence_length is not None and length is not None and length > max_sequence_length:
        raise ValueError(
            f"`{name}` has length {length}, longer than the model's "
            f"max_sequence_length={max_sequence_length}. Pass at most "
            f"{max_sequence_length} tokens; inputs are never truncated silently."
        )
    if not check_values:
        return
    values = concrete_value(token_ids)
    if values is None or values.size == 0:
        return
    low, high = int(values.min()), int(values.max())
    if low < 0 or high >= vocabulary_size:
        bad = low if low < 0 else high
        raise ValueError(
            f"`{name}` contains the id {bad}, outside the vocabulary: ids must "
            f"lie in [0, {vocabulary_size - 1}] (vocabulary_size="
            f"{vocabulary_size})."
        )


def check_padding_mask(padding_mask, token_ids, name: str = "padding_mask") -> None:
    """Raises ValueError unless `padding_mask` matches `token_ids`' shape."""
    if padding_mask is None:
        return
    mask_shape = tuple(padding_mask.shape)
    ids_shape = tuple(token_ids.shape)
    if len(mask_shape) != 2 or any(
        a is not None and b is not None and a != b for a, b in zip(mask_shape, ids_shape)
    ):
        raise ValueError(
            f"`{name}` must have the shape of `token_ids` {ids_shape}. Received shape {mask_shape}."
        )
