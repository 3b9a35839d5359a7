"""Decoder-only backbone shared by Primer EZ and the Transformer baseline."""

import keras

from keras_primer.activations import get_activation, serialize_activation
from keras_primer.layers.position_embedding import PaddingAwarePositionEmbedding
from keras_primer.models.base import CheckedBackbone, normal_initializer, token_embedding
from keras_primer.models.primer.primer_decoder_block import PrimerDecoderBlock


@keras.saving.register_keras_serializable(package="keras_primer")
class PrimerBackbone(CheckedBackbone):
    """Token + position embedding, `num_layers` decoder blocks, final norm.

    The defaults build Primer EZ: squared-ReLU feed-forward blocks and
    multi-DConv-head attention. `activation="gelu", use_dconv=False` builds the
    vanilla Transformer baseline from the same code.

    Inputs are a dict of `"token_ids"` (int `[batch, length]`) and
    `"padding_mask"` (`[batch, length]`, 1 for real tokens); padding may be on
    either side. The output is the final hidden states `[batch, length,
    hidden_dim]`.

    Args:
        vocabulary_size: Number of token ids.
        num_layers: Number of decoder blocks.
        num_heads: Attention heads per block.
        hidden_dim: Model width.
        intermediate_dim: Feed-forward hidden width.
        dropout: Dropout rate (embeddings, residuals, attention, feed-forward).
        max_sequence_length: Longest input the model accepts.
        kernel_size: Depthwise convolution width of MDHA.
        activation: Feed-forward activation (`"squared_relu"` for Primer).
        use_dconv: Multi-DConv-head attention (True) or plain attention.
        share_conv_kernels_across_heads: labml-nn compatible kernel sharing.
        conv_bias: Bias after each depthwise convolution.
        layer_norm_epsilon: Epsilon of every layer norm.
        tie_embeddings: Share the token embedding with the output projection.
        dtype: Dtype policy of the layers (e.g. `"mixed_bfloat16"`).

    Mixed precision (e.g. `dtype="mixed_bfloat16"`): every weight (token
    embedding and tied head, position embedding, projections, depthwise
    convolution taps and biases, layer norms, feed-forward) is stored in
    float32 and computed in bfloat16; attention softmax runs in float32; the
    output hidden states are bfloat16.

    Quantization and LoRA: `quantize("int8")`/`"int4"` reach the token
    embedding (also the tied head) and every dense projection;
    `enable_lora(rank)` adapts the attention's `query` and `value`.

    Example:

    >>> import numpy as np
    >>> backbone = PrimerBackbone(
    ...     vocabulary_size=256, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, max_sequence_length=32)
    >>> inputs = {"token_ids": np.ones((1, 8), "int32"),
    ...           "padding_mask": np.ones((1, 8), "int32")}
    >>> tuple(backbone(inputs).shape)
    (1, 8, 16)
    """

    def __init__(
        self,
        vocabulary_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        intermediate_dim: int,
        dropout: float = 0.0,
        max_sequence_length: int = 1024,
        kernel_size: int = 3,
        activation="squared_relu",
        use_dconv: bool = True,
        share_conv_kernels_across_heads: bool = False,
        conv_bias: bool = False,
        layer_norm_epsilon: float = 1e-5,
        tie_embeddings: bool = True,
        dtype=None,
        **kwargs,
    ):
        if hidden_dim % num_heads:
            raise ValueError(
                f"`hidden_dim` ({hidden_dim}) must be divisible by `num_heads` ({num_heads})."
            )
        # === Layers ===
        self.token_embedding = token_embedding(vocabulary_size, hidden_dim, tie_embeddings, dtype)
        self.position_embedding = PaddingAwarePositionEmbedding(
            sequence_length=max_sequence_length,
            initializer=normal_initializer(),
            dtype=dtype,
            name="position_embedding",
        )
        self.embeddings_add = keras.layers.Add(dtype=dtype, name="embeddings_add")
        self.embeddings_dropout = keras.layers.Dropout(
            dropout, dtype=dtype, name="embeddings_dropout"
        )
        self.transformer_layers = [
            PrimerDecoderBlock(
                num_heads=num_heads,
                intermediate_dim=intermediate_dim,
                activation=activation,
                use_dconv=use_dconv,
                kernel_size=kernel_size,
                share_conv_kernels_across_heads=share_conv_kernels_across_heads,
                conv_bias=conv_bias,
                dropout=dropout,
                layer_norm_epsilon=layer_norm_epsilon,
                kernel_initializer=normal_initializer(),
                dtype=dtype,
                name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.layer_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="layer_norm"
        )

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = self.embed(token_ids, padding_mask)
        for block in self.transformer_layers:
            x = block(x, padding_mask=padding_mask)
        outputs = self.layer_norm(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=outputs,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.dropout = dropout
        self.max_sequence_length = max_sequence_length
        self.kernel_size = kernel_size
        self.activation = get_activation(activation)
        self.use_dconv = use_dconv
        self.share_conv_kernels_across_heads = share_conv_kernels_across_heads
        self.conv_bias = conv_bias
        self.layer_norm_epsilon = layer_norm_epsilon
        self.tie_embeddings = tie_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    @property
    def conv_state_length(self) -> int:
        """Pre-convolution rows a cached decoding step keeps per q/k/v."""
        return self.kernel_size - 1 if self.use_dconv else 0

    def embed(self, token_ids, padding_mask=None, start_index=0, training=None):
        """Token plus position embeddings (then dropout) for `token_ids`."""
        tokens = self.token_embedding(token_ids)
        positions = self.position_embedding(
            tokens, padding_mask=padding_mask, start_index=start_index
        )
        x = self.embeddings_add((tokens, positions))
        return self.embeddings_dropout(x, training=training)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "dropout": self.dropout,
                "max_sequence_length": self.max_sequence_length,
                "kernel_size": self.kernel_size,
                "activation": serialize_activation(self.activation),
                "use_dconv": self.use_dconv,
                "share_conv_kernels_across_heads": self.share_conv_kernels_across_heads,
                "conv_bias": self.conv_bias,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "tie_embeddings": self.tie_embeddings,
            }
        )
        return config
