"""Pre-LayerNorm decoder block shared by Primer EZ and the Transformer baseline."""

import keras

from keras_primer.activations import get_activation, serialize_activation
from keras_primer.layers.feed_forward import FeedForward
from keras_primer.layers.residual import pre_norm_residual
from keras_primer.models.primer.multi_dconv_head_attention import MultiDConvHeadAttention


@keras.saving.register_keras_serializable(package="keras_primer")
class PrimerDecoderBlock(keras.layers.Layer):
    """`x + drop(attn(norm(x)))`, then `x + drop(ffn(norm(x)))`.

    The two Primer EZ changes are independent switches: `activation`
    (`"squared_relu"` for Primer, `"gelu"`/`"relu"` for the baseline) and
    `use_dconv` (multi-DConv-head attention or plain multi-head attention).

    Args:
        num_heads: Attention heads.
        intermediate_dim: Feed-forward hidden width.
        activation: Feed-forward activation.
        use_dconv: Depthwise convolutions after Q, K, V.
        kernel_size: Convolution width.
        share_conv_kernels_across_heads: labml-nn compatible kernel sharing.
        conv_bias: Bias after each convolution.
        dropout: Residual, attention and feed-forward dropout rate.
        layer_norm_epsilon: Epsilon of both layer norms.
        kernel_initializer: Initializer of the dense kernels.

    Padding: pass `padding_mask`, or call the block on a tensor that carries
    a Keras mask (e.g. after `Embedding(mask_zero=True)`); the mask is used
    as the padding mask and passed on to the output.

    Mixed precision: every weight (norms, projections, convolution taps,
    feed-forward) is stored in the policy's variable dtype (float32 under
    `mixed_bfloat16`) and used in the compute dtype.

    Example:

    >>> import numpy as np
    >>> block = PrimerDecoderBlock(num_heads=2, intermediate_dim=32)
    >>> tuple(block(np.ones((1, 4, 16), "float32")).shape)
    (1, 4, 16)
    """

    def __init__(
        self,
        num_heads: int,
        intermediate_dim: int,
        activation="squared_relu",
        use_dconv: bool = True,
        kernel_size: int = 3,
        share_conv_kernels_across_heads: bool = False,
        conv_bias: bool = False,
        dropout: float = 0.0,
        layer_norm_epsilon: float = 1e-5,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.activation = get_activation(activation)
        self.use_dconv = use_dconv
        self.kernel_size = kernel_size
        self.share_conv_kernels_across_heads = share_conv_kernels_across_heads
        self.conv_bias = conv_bias
        self.dropout = dropout
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.supports_masking = True

    def build(self, input_shape):
        hidden_dim = input_shape[-1]
        if hidden_dim % self.num_heads:
            raise ValueError(
                f"The hidden size ({hidden_dim}) must be divisible by the number "
                f"of heads ({self.num_heads})."
            )
        policy = self.dtype_policy
        self.attention_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="attention_norm"
        )
        self.attention = MultiDConvHeadAttention(
            num_heads=self.num_heads,
            key_dim=hidden_dim // self.num_heads,
            kernel_size=self.kernel_size,
            use_dconv=self.use_dconv,
            share_conv_kernels_across_heads=self.share_conv_kernels_across_heads,
            conv_bias=self.conv_bias,
            dropout=self.dropout,
            kernel_initializer=self.kernel_initializer,
            dtype=policy,
            name="attention",
        )
        self.feed_forward_norm = keras.layers.LayerNormalization(
            epsilon=self.layer_norm_epsilon, dtype=policy, name="feed_forward_norm"
        )
        self.feed_forward = FeedForward(
            self.intermediate_dim,
            activation=self.activation,
            dropout=self.dropout,
            kernel_initializer=self.kernel_initializer,
            dtype=policy,
            name="feed_forward",
        )
        self.residual_dropout = keras.layers.Dropout(self.dropout, dtype=policy)
        for layer in (
            self.attention_norm,
            self.attention,
            self.feed_forward_norm,
            self.feed_forward,
        ):
            layer.build(input_shape)
        self.built = True

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
        """Runs the block; with `cache`, returns `(outputs, next_cache)`.

        The arguments are those of `MultiDConvHeadAttention.call`; `mask`
        (a Keras mask) serves as `padding_mask` when that is not given.
        """
        if padding_mask is None and cache is None:
            padding_mask = mask
        next_cache = []

        def attend(normed):
            out = self.attention(
                normed,
                padding_mask=padding_mask,
                cache=cache,
                cache_update_index=cache_update_index,
                conv_state_index=conv_state_index,
                training=training,
            )
            if cache is None:
                return out
            next_cache.append(out[1])
            return out[0]

        def drop(branch):
            return self.residual_dropout(branch, training=training)

        x = pre_norm_residual(inputs, self.attention_norm, attend, drop)
        x = pre_norm_residual(
            x, self.feed_forward_norm, lambda y: self.feed_forward(y, training=training), drop
        )
        if cache is None:
            return x
        return x, next_cache[0]

    def compute_mask(self, inputs, mask=None):
        return mask

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "activation": serialize_activation(self.activation),
                "use_dconv": self.use_dconv,
                "kernel_size": self.kernel_size,
                "share_conv_kernels_across_heads": self.share_conv_kernels_across_heads,
                "conv_bias": self.conv_bias,
                "dropout": self.dropout,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
