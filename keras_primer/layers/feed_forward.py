"""Position-wise feed-forward block with a configurable activation."""

import keras

from keras_primer.activations import get_activation, serialize_activation
from keras_primer.layers.residual import call_sublayer


@keras.saving.register_keras_serializable(package="keras_primer")
class FeedForward(keras.layers.Layer):
    """`Dense(intermediate_dim) -> activation -> dropout -> Dense(hidden)`.

    Primer EZ uses `activation="squared_relu"`; the Transformer baseline
    uses `"gelu"` or `"relu"`. Only the activation differs, so both have the
    same parameter count.

    Args:
        intermediate_dim: Width of the hidden layer.
        activation: Activation name or callable (`"squared_relu"` included).
        dropout: Dropout rate on the hidden activation.
        use_bias: Biases in both dense layers.
        kernel_initializer: Initializer of both kernels.

    Mixed precision: both kernels and biases are stored in the policy's
    variable dtype (float32 under `mixed_bfloat16`) and used in the compute
    dtype. A Keras mask passes through unchanged (position-wise layer).

    Example:

    >>> import numpy as np
    >>> ffn = FeedForward(intermediate_dim=16, activation="squared_relu")
    >>> tuple(ffn(np.ones((2, 3, 8), "float32")).shape)
    (2, 3, 8)
    """

    def __init__(
        self,
        intermediate_dim: int,
        activation="squared_relu",
        dropout: float = 0.0,
        use_bias: bool = True,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.intermediate_dim = intermediate_dim
        self.activation = get_activation(activation)
        self.dropout = dropout
        self.use_bias = use_bias
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.supports_masking = True

    def build(self, input_shape):
        common = dict(
            use_bias=self.use_bias,
            kernel_initializer=self.kernel_initializer,
            dtype=self.dtype_policy,
        )
        self.intermediate_dense = keras.layers.Dense(
            self.intermediate_dim, name="intermediate", **common
        )
        self.output_dense = keras.layers.Dense(input_shape[-1], name="output", **common)
        self.dropout_layer = keras.layers.Dropout(self.dropout, dtype=self.dtype_policy)
        self.intermediate_dense.build(input_shape)
        self.output_dense.build(tuple(input_shape[:-1]) + (self.intermediate_dim,))
        self.built = True

    def call(self, inputs, training=None):
        # The dense layers share this layer's dtype policy, already applied
        # by `__call__`; `call_sublayer` saves their `__call__` overhead.
        hidden = self.activation(call_sublayer(self.intermediate_dense, inputs))
        if self.dropout:
            hidden = self.dropout_layer(hidden, training=training)
        return call_sublayer(self.output_dense, hidden)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                "activation": serialize_activation(self.activation),
                "dropout": self.dropout,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
            }
        )
        return config
