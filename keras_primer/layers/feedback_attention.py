"""Feedback Transformer attention: one query step over the feedback memory.

The memory, the time loop and the layer stack live in
`keras_primer.layers.feedback_stack` (with the maths and every difference to
labml-nn); this module holds only the attention with learned relative
positions, `[(q + u) . k_s + q . P[t - s] + S[t - s]] / sqrt(head_dim)`.
"""

import math

import keras
from keras import ops

from keras_primer.layers.residual import call_sublayer

_MASK_VALUE = -1e9


@keras.saving.register_keras_serializable(package="keras_primer")
class FeedbackAttention(keras.layers.Layer):
    """Attention of one query step over feedback-memory keys and values.

    The layer owns the query projection `query` (an `EinsumDense`, no bias,
    so `enable_lora` and `quantize` reach it), the output projection
    `attention_output` (with bias) and the relative-position parameters: per-offset key embeddings
    `P` (`[max_relative_distance, num_heads, key_dim]`), per-offset biases `S`
    (`[max_relative_distance, num_heads]`) and a content bias `u`
    (`[num_heads, key_dim]`), all zero-initialised. Offset `1` (the previous
    step) is row 0 of the tables. Keys and values come from the caller
    (`FeedbackStack` projects each memory slot once).

    Args:
        num_heads: Attention heads.
        key_dim: Size of each head.
        max_relative_distance: Largest step offset with its own table row;
            larger offsets share the last row.
        kernel_initializer: Initializer of the projection kernels.

    Mixed precision: every weight is stored in the policy's variable dtype
    (float32 under `mixed_bfloat16`) and used in the compute dtype; the
    scores' softmax runs in float32.

    Call arguments:
        query: `[batch, hidden_dim]`, the (normalised) input of this step.
        keys, values: `[batch, memory_length, num_heads, key_dim]`.
        relative_index: int `[memory_length]`, table row of each slot
            (`offset - 1`, clipped to the table).
        attention_mask: bool `[batch or 1, memory_length]`, True = attend.

    Example:

    >>> import numpy as np
    >>> attention = FeedbackAttention(num_heads=2, key_dim=4, max_relative_distance=8)
    >>> out = attention(np.ones((1, 8), "float32"), np.ones((1, 3, 2, 4), "float32"),
    ...     np.ones((1, 3, 2, 4), "float32"), np.array([2, 1, 0]),
    ...     np.ones((1, 3), bool))
    >>> tuple(out.shape)
    (1, 8)
    """

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        max_relative_distance: int,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.max_relative_distance = max_relative_distance
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(
        self,
        query_shape,
        keys_shape=None,
        values_shape=None,
        relative_index_shape=None,
        attention_mask_shape=None,
    ):
        hidden_dim = query_shape[-1]
        heads = (self.num_heads, self.key_dim)
        self.query_dense = keras.layers.EinsumDense(
            "bd,dhk->bhk",
            output_shape=heads,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="query",
        )
        self.query_dense.build((None, hidden_dim))
        self.output_dense = keras.layers.EinsumDense(
            "bhk,hkd->bd",
            output_shape=(hidden_dim,),
            bias_axes="d",
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
            name="attention_output",
        )
        self.output_dense.build((None,) + heads)
        self.relative_key_embedding = self.add_weight(
            shape=(self.max_relative_distance,) + heads,
            initializer="zeros",
            name="relative_key_embedding",
        )
        self.relative_bias = self.add_weight(
            shape=(self.max_relative_distance, self.num_heads),
            initializer="zeros",
            name="relative_bias",
        )
        self.query_bias = self.add_weight(shape=heads, initializer="zeros", name="query_bias")
        self.built = True

    def call(self, query, keys, values, relative_index, attention_mask):
        q = call_sublayer(self.query_dense, query)
        content = ops.einsum("bhk,bshk->bhs", q + self.query_bias, keys)
        position_keys = ops.take(self.relative_key_embedding, relative_index, axis=0)
        position = ops.einsum("bhk,shk->bhs", q, position_keys)
        bias = ops.transpose(ops.take(self.relative_bias, relative_index, axis=0))
        scores = (content + position + bias[None]) * (1.0 / math.sqrt(self.key_dim))
        scores = ops.cast(scores, "float32")
        mask = ops.cast(attention_mask, "bool")[:, None, :]
        scores = ops.where(mask, scores, _MASK_VALUE)
        probs = ops.cast(ops.softmax(scores, axis=-1), values.dtype)
        attended = ops.einsum("bhs,bshk->bhk", probs, values)
        return call_sublayer(self.output_dense, attended)

    def compute_output_shape(
        self,
        query_shape,
        keys_shape=None,
        values_shape=None,
        relative_index_shape=None,
        attention_mask_shape=None,
    ):
        return query_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "max_relative_distance": self.max_relative_distance,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
