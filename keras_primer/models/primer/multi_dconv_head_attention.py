"""Multi-DConv-Head Attention (MDHA), the attention of Primer EZ."""

import math

import keras
from keras import ops

from keras_primer.layers.cache_utils import causal_attention_mask, write_rows
from keras_primer.layers.causal_depthwise_conv import (
    CausalDepthwiseConv,
    causal_depthwise_conv,
)


@keras.saving.register_keras_serializable(package="keras_primer")
class MultiDConvHeadAttention(keras.layers.Layer):
    """Causal self-attention with a depthwise convolution after Q, K and V.

    Each of the query, key and value projections is split into heads and then
    convolved along the sequence by a causal depthwise convolution of width
    `kernel_size` (zero history before the first position), before scaled
    dot-product attention and the output projection. With `use_dconv=False`
    this is standard causal multi-head attention, the Transformer baseline.

    Incremental decoding keeps per layer the post-convolution keys and values
    of every position, heads first as attention reads them (`"key"`,
    `"value"`: `[batch, heads, length, head_dim]`), and the convolution state,
    the last `kernel_size - 1` pre-convolution rows of q, k and v (`"conv"`:
    `[batch, 3, kernel_size - 1, heads, head_dim]`).

    Args:
        num_heads: Number of attention heads.
        key_dim: Size of each head.
        kernel_size: Width of the depthwise convolutions.
        use_dconv: Apply the depthwise convolutions (Primer); `False` gives
            plain multi-head attention.
        share_conv_kernels_across_heads: One set of per-channel kernels used by
            every head, as in the labml-nn reference, instead of one kernel per
            (head, channel) as in the paper.
        conv_bias: Learned bias after each convolution (labml-nn has one).
        dropout: Dropout rate on the attention probabilities.
        use_bias: Biases in the Q, K, V and output projections.
        kernel_initializer: Initializer of the projection kernels.
        bias_initializer: Initializer of the projection biases.
        conv_kernel_initializer: Initializer of the convolution taps.

    Padding: pass `padding_mask`, or call the layer on a tensor that carries
    a Keras mask (e.g. after `Embedding(mask_zero=True)`); without a cache
    the mask is used as the padding mask and passed on to the output.

    Mixed precision: every weight (projection kernels and biases,
    convolution taps and biases) is stored in the policy's variable dtype
    (float32 under `mixed_bfloat16`) and used in the compute dtype; the
    attention softmax runs in float32 on the explicit (dropout) path and in
    the backend's fused kernel otherwise.

    Example:

    >>> import numpy as np
    >>> attention = MultiDConvHeadAttention(num_heads=2, key_dim=4)
    >>> x = np.random.rand(1, 5, 8).astype("float32")
    >>> tuple(attention(x).shape)
    (1, 5, 8)
    """

    def __init__(
        self,
        num_heads: int,
        key_dim: int,
        kernel_size: int = 3,
        use_dconv: bool = True,
        share_conv_kernels_across_heads: bool = False,
        conv_bias: bool = False,
        dropout: float = 0.0,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        conv_kernel_initializer="causal_smoothing",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.kernel_size = kernel_size
        self.use_dconv = use_dconv
        self.share_conv_kernels_across_heads = share_conv_kernels_across_heads
        self.conv_bias = conv_bias
        self.dropout = dropout
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.conv_kernel_initializer = conv_kernel_initializer
        self.supports_masking = True

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        common = dict(
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            dtype=self.dtype_policy,
        )
        head_shape = (None, self.num_heads, self.key_dim)
        head_bias = "de" if self.use_bias else None
        self.query_dense = keras.layers.EinsumDense(
            "abc,cde->abde", head_shape, bias_axes=head_bias, name="query", **common
        )
        self.key_dense = keras.layers.EinsumDense(
            "abc,cde->abde", head_shape, bias_axes=head_bias, name="key", **common
        )
        self.value_dense = keras.layers.EinsumDense(
            "abc,cde->abde", head_shape, bias_axes=head_bias, name="value", **common
        )
        self.output_dense = keras.layers.EinsumDense(
            "abcd,cde->abe",
            (None, hidden_dim),
            bias_axes="e" if self.use_bias else None,
            name="attention_output",
            **common,
        )
        for dense in (self.query_dense, self.key_dense, self.value_dense):
            dense.build(input_shape)
        heads_shape = tuple(input_shape[:-1]) + (self.num_heads, self.key_dim)
        self.output_dense.build(heads_shape)
        self.convs = []
        if self.use_dconv:
            for name in ("query_conv", "key_conv", "value_conv"):
                conv = CausalDepthwiseConv(
                    kernel_size=self.kernel_size,
                    share_across_heads=self.share_conv_kernels_across_heads,
                    use_bias=self.conv_bias,
                    kernel_initializer=self.conv_kernel_initializer,
                    dtype=self.dtype_policy,
                    name=name,
                )
                conv.build(heads_shape)
                self.convs.append(conv)
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.built = True

    @property
    def conv_state_length(self) -> int:
        """Rows of pre-convolution history a decoding step needs (0 if none)."""
        return self.kernel_size - 1 if self.use_dconv else 0

    def call(
        self,
        inputs,
        padding_mask=None,
        cache=None,
        cache_update_index=None,
        conv_state_index=None,
        training=None,
        mask=None,
    ):
        """Causal self-attention over `inputs` (`[batch, length, hidden]`).

        Args:
            inputs: Hidden states.
            padding_mask: Bool `[batch, length]` (no cache) or
                `[batch, max_length]` (with a cache): False marks padding,
                which no query attends to and which the convolutions see as
                zeros. None means no padding.
            cache: Optional dict with `"key"`, `"value"` and, if the layer
                has convolutions of width > 1, `"conv"` (see the class
                docstring). Enables incremental decoding.
            cache_update_index: Position of `inputs[:, 0]` in the sequence;
                required with `cache`.
            conv_state_index: Optional position (relative to `inputs[:, 0]`)
                before which the returned convolution state is taken; defaults
                to just after the last input.
            training: Enables attention dropout.
            mask: A Keras mask of `inputs` (set by Keras); used as
                `padding_mask` when that is None and there is no cache.

        Returns:
            The attention output, or `(output, next_cache)` with a cache.
        """
        if padding_mask is None and cache is None:
            padding_mask = mask
        length = ops.shape(inputs)[1]
        query_mask = padding_mask
        start = 0
        if cache is not None:
            if cache_update_index is None:
                raise ValueError("`cache_update_index` is required with `cache`.")
            start = cache_update_index
            if padding_mask is not None:
                rows = ops.arange(length, dtype="int32") + ops.cast(start, "int32")
                query_mask = ops.take(padding_mask, rows, axis=1)

        next_conv_state = None
        if not self.convs:
            query = self.query_dense(inputs)
            key = self.key_dense(inputs)
            value = self.value_dense(inputs)
        else:
            # q, k and v side by side on axis 2, so the mask and the three
            # convolutions are one pass each. Padding rows are zeroed so they
            # cannot leak into later positions through the convolutions.
            qkv = self._project_qkv(inputs)
            if query_mask is not None:
                qkv = qkv * ops.cast(query_mask, qkv.dtype)[:, :, None, None, None]
            kernel = ops.stack([c.channel_kernel() for c in self.convs], axis=1)
            bias = None
            if self.conv_bias:
                bias = ops.stack([c.channel_bias() for c in self.convs], axis=0)
            state = None
            if cache is not None and self.conv_state_length > 0:
                # Cache layout [batch, 3, rows, heads, head_dim] -> rows first.
                state = ops.transpose(cache["conv"], (0, 2, 1, 3, 4))
            qkv, next_state = causal_depthwise_conv(qkv, kernel, bias, state, conv_state_index)
            if state is not None:
                next_conv_state = ops.transpose(next_state, (0, 2, 1, 3, 4))
            # unstack, not three slices: TensorFlow's gradient of a slice is a
            # zero-filled tensor of the full shape; of an unstack, one stack.
            query, key, value = ops.unstack(qkv, num=3, axis=2)

        if cache is None:
            attended = self._attend(
                query, key, value, padding_mask, query_start=0, training=training
            )
            return self.output_dense(attended)

        # Heads first, as the cache keeps them: only the new rows move.
        key_cache = write_rows(cache["key"], ops.transpose(key, (0, 2, 1, 3)), start, axis=2)
        value_cache = write_rows(cache["value"], ops.transpose(value, (0, 2, 1, 3)), start, axis=2)
        attended = self._attend_cached(query, key_cache, value_cache, padding_mask, start)
        next_cache = {"key": key_cache, "value": value_cache}
        if next_conv_state is not None:
            next_cache["conv"] = next_conv_state
        return self.output_dense(attended), next_cache

    def _project_qkv(self, inputs):
        """`[batch, length, 3, heads, head_dim]`: q, k, v from one matmul.

        The three projections keep their own weights (and LoRA, which their
        `kernel` property includes); quantized projections run one by one.
        """
        denses = (self.query_dense, self.key_dense, self.value_dense)
        if any(dense.quantization_mode for dense in denses):
            return ops.stack([dense(inputs) for dense in denses], axis=2)
        kernel = ops.stack([ops.cast(d.kernel, inputs.dtype) for d in denses], axis=1)
        qkv = ops.einsum("btc,cshd->btshd", inputs, kernel)
        if self.use_bias:
            qkv = qkv + ops.stack([ops.cast(d.bias, inputs.dtype) for d in denses], axis=0)
        return qkv

    def _attend(self, query, key, value, key_padding_mask, query_start, training):
        scale = 1.0 / math.sqrt(self.key_dim)
        query_length, key_length = ops.shape(query)[1], ops.shape(key)[1]
        use_dropout = training and self.dropout > 0
        is_plain_causal = (
            key_padding_mask is None and isinstance(query_start, int) and query_start == 0
        )
        if not use_dropout and is_plain_causal:
            return ops.dot_product_attention(query, key, value, scale=scale, is_causal=True)
        mask = causal_attention_mask(query_length, key_length, query_start, key_padding_mask)
        if not use_dropout:
            return ops.dot_product_attention(query, key, value, mask=mask, scale=scale)
        # dot_product_attention has no dropout on the probabilities: spell it out.
        scores = ops.einsum("bqhd,bkhd->bhqk", query, key) * ops.cast(scale, query.dtype)
        scores = ops.cast(scores, "float32")
        scores = ops.where(mask, scores, ops.full_like(scores, -1e9))
        probabilities = ops.cast(ops.softmax(scores, axis=-1), query.dtype)
        probabilities = self.dropout_layer(probabilities, training=training)
        return ops.einsum("bhqk,bkhd->bqhd", probabilities, value)

    def _attend_cached(self, query, key_cache, value_cache, key_padding_mask, query_start):
        """Attention of `query` `[batch, n, heads, head_dim]` (positions
        `query_start ..`) over heads-first caches `[batch, heads, length,
        head_dim]`, as two batched matmuls (`q k^T`, then the probabilities
        times `v`), so no cache row is moved: the decoding step reads the
        keys and values once. Softmax in float32."""
        scale = 1.0 / math.sqrt(self.key_dim)
        query = ops.transpose(query, (0, 2, 1, 3))  # [batch, heads, n, head_dim]
        scores = ops.matmul(query, ops.transpose(key_cache, (0, 1, 3, 2)))
        scores = ops.cast(scores, "float32") * scale
        mask = causal_attention_mask(
            ops.shape(query)[2], ops.shape(key_cache)[2], query_start, key_padding_mask
        )
        scores = ops.where(mask, scores, ops.full_like(scores, -1e9))
        probabilities = ops.cast(ops.softmax(scores, axis=-1), value_cache.dtype)
        attended = ops.matmul(probabilities, value_cache)  # [batch, heads, n, head_dim]
        return ops.transpose(attended, (0, 2, 1, 3))

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "key_dim": self.key_dim,
                "kernel_size": self.kernel_size,
                "use_dconv": self.use_dconv,
                "share_conv_kernels_across_heads": self.share_conv_kernels_across_heads,
                "conv_bias": self.conv_bias,
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
                "conv_kernel_initializer": self.conv_kernel_initializer
                if isinstance(self.conv_kernel_initializer, str)
                else keras.initializers.serialize(self.conv_kernel_initializer),
            }
        )
        return config
