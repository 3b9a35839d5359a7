"""Feedback Transformer attention: one query step over the feedback memory.

The memory, the time loop and the layer stack live in
`keras_primer.models.feedback.feedback_stack` (with the maths and every difference to
labml-nn); this module holds only the attention with learned relative
positions, `[(q + u) . k_s + q . P[t - s] + S[t - s]] / sqrt(head_dim)`,
and, with `use_dconv=True`, the causal depthwise convolution of the queries
over time (Primer's MDHA inside the Feedback step).
"""

import math

import keras
from keras import ops

from keras_primer.layers.causal_depthwise_conv import CausalDepthwiseConv, causal_depthwise_conv
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

    With `use_dconv=True` the projected query `q_t` is replaced by
    `sum_i c_i * q_{t-i}` (`i < kernel_size`, one kernel per head-channel,
    sublayer `query_conv`, a `CausalDepthwiseConv` initialised as in Primer:
    0.5 on the current step, the rest shared by the past ones). A step sees
    its own raw query only, so the caller passes the raw queries of the
    `kernel_size - 1` previous steps (`query_state`) and gets the next state
    back.

    Args:
        num_heads: Attention heads.
        key_dim: Size of each head.
        max_relative_distance: Largest step offset with its own table row;
            larger offsets share the last row.
        kernel_initializer: Initializer of the projection kernels.
        use_dconv: Convolve the queries over time (see above).
        kernel_size: Width of that convolution.

    Mixed precision: every weight is stored in the policy's variable dtype
    (float32 under `mixed_bfloat16`) and used in the compute dtype; the
    scores' softmax runs in float32.

    Call arguments:
        query: `[batch, hidden_dim]`, the (normalised) input of this step.
        keys, values: `[batch, memory_length, num_heads, key_dim]`.
        relative_index: int `[memory_length]`, table row of each slot
            (`offset - 1`, clipped to the table).
        attention_mask: bool `[batch or 1, memory_length]`, True = attend.
        query_state: Optional (`use_dconv` only) `[batch, kernel_size - 1,
            num_heads, key_dim]`, the raw queries of the previous steps,
            oldest first (None = zeros: the first step).
        query_keep: Optional `[batch]`, 0 where this step is padding: its raw
            query then enters the returned state as zeros, so that padding
            does not leak into later steps' queries.

    Returns the attention output `[batch, hidden_dim]`, and with a
    `query_state` also the next query state.

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
        use_dconv: bool = False,
        kernel_size: int = 3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(kernel_size) < 1:
            raise ValueError(f"`kernel_size` must be at least 1. Received: {kernel_size}")
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.max_relative_distance = max_relative_distance
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.use_dconv = bool(use_dconv)
        self.kernel_size = int(kernel_size)

    @property
    def conv_state_length(self) -> int:
        """Raw query rows of earlier steps a step needs (0 without the conv)."""
        return self.kernel_size - 1 if self.use_dconv else 0

    def build(
        self,
        query_shape,
        keys_shape=None,
        values_shape=None,
        relative_index_shape=None,
        attention_mask_shape=None,
        query_state_shape=None,
        query_keep_shape=None,
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
        self.query_conv = None
        if self.use_dconv:
            self.query_conv = CausalDepthwiseConv(
                kernel_size=self.kernel_size, dtype=self.dtype_policy, name="query_conv"
            )
            self.query_conv.build((None, None) + heads)
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

    def call(
        self,
        query,
        keys,
        values,
        relative_index,
        attention_mask,
        query_state=None,
        query_keep=None,
    ):
        q = call_sublayer(self.query_dense, query)
        next_state = None
        if self.query_conv is not None:
            if query_keep is not None:
                q = q * ops.cast(query_keep, q.dtype)[:, None, None]
            # One row: the shifted sum is a few slices and multiplies on
            # every runtime (exporters included).
            convolved, next_state = causal_depthwise_conv(
                q[:, None],
                self.query_conv.channel_kernel(),
                state=query_state,
                formulation="shifted",
            )
            q = convolved[:, 0]
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
        output = call_sublayer(self.output_dense, attended)
        if query_state is None:
            return output
        return output, query_state if next_state is None else next_state

    def compute_output_shape(
        self,
        query_shape,
        keys_shape=None,
        values_shape=None,
        relative_index_shape=None,
        attention_mask_shape=None,
        query_state_shape=None,
        query_keep_shape=None,
    ):
        if query_state_shape is not None:
            return query_shape, query_state_shape
        return query_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "max_relative_distance": self.max_relative_distance,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "use_dconv": self.use_dconv,
                "kernel_size": self.kernel_size,
            }
        )
        return config
