"""Feedback Transformer backbone: token embedding, feedback layers, final norm."""

import keras

from keras_primer.activations import get_activation, serialize_activation
from keras_primer.models.base import CheckedBackbone, normal_initializer, token_embedding
from keras_primer.models.feedback.feedback_stack import FeedbackStack


@keras.saving.register_keras_serializable(package="keras_primer")
class FeedbackBackbone(CheckedBackbone):
    """Feedback Transformer (Fan et al. 2020) with labml-nn semantics.

    Token embedding (no absolute positions) -> `FeedbackStack` (all layers
    and the feedback memory, run as one time loop) -> final layer norm. Every
    layer at step `t` attends to the memory slots of the steps `< t`; each
    slot mixes the outputs of all layers at its step, the embedding included,
    with softmax-normalised learned weights. Positions enter only through
    learned relative terms in the attention scores. See
    `keras_primer.models.feedback.feedback_stack` for the maths and every
    difference to the reference.

    Inputs are a dict of `"token_ids"` (int `[batch, length]`) and
    `"padding_mask"` (`[batch, length]`, 1 for real tokens); padding slots
    are never attended to, so right or left padding gives the same outputs at
    the real tokens as the unpadded sequence. The output is the final hidden
    states `[batch, length, hidden_dim]`.

    Args:
        vocabulary_size: Number of token ids.
        num_layers: Number of feedback layers.
        num_heads: Attention heads per layer.
        hidden_dim: Model width.
        intermediate_dim: Feed-forward hidden width.
        dropout: Dropout on the embeddings and both residual branches.
        max_sequence_length: Longest input the model accepts (sizes the
            relative-position tables).
        activation: Feed-forward activation; `"squared_relu"` gives the
            Primer-style Feedback Transformer.
        shared_kv: True: one key/value projection shared by all layers (the
            fast variant, labml's `FeedbackTransformerKV`); False: one per
            layer (the original).
        memory_window: None, or attend only to the last `memory_window` steps.
        layer_norm_epsilon: Epsilon of every layer norm.
        tie_embeddings: Share the token embedding with the output projection.
        use_dconv: Primer's MDHA inside the Feedback step: causal depthwise
            convolutions over time (per head-channel kernels, Primer's
            initialisation) on every layer's queries and on the memory's
            keys and values; with `activation="squared_relu"` this is
            "Primer EZ + Feedback". The convolution states join the decoding
            cache.
        kernel_size: Width of those convolutions.
        dtype: Dtype policy of the layers (e.g. `"mixed_bfloat16"`).

    Mixed precision (e.g. `dtype="mixed_bfloat16"`): every weight is stored
    in float32 and computed in bfloat16 (token embedding and tied head,
    projections, relative-position tables, layer norms, feed-forward), except
    the stack's `layer_weights`, which are stored in float32 and never
    autocast (the softmax over layers runs in float32). Attention softmax runs in float32;
    the output hidden states are bfloat16.

    Random ops: the dropout masks draw their seed from Keras' global RNG, so
    `keras.utils.set_random_seed` makes training reproducible.

    Quantization and LoRA: `quantize("int8")`/`"int4"` reach the token
    embedding (also the tied head) and every projection; `enable_lora(rank)`
    adapts each layer's `query` and the memory's shared `value` projection.

    Example:

    >>> import numpy as np
    >>> backbone = FeedbackBackbone(
    ...     vocabulary_size=256, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, max_sequence_length=32,
    ...     activation="squared_relu", use_dconv=True)
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
        activation="relu",
        shared_kv: bool = True,
        memory_window: int | None = None,
        layer_norm_epsilon: float = 1e-5,
        tie_embeddings: bool = True,
        use_dconv: bool = False,
        kernel_size: int = 3,
        dtype=None,
        **kwargs,
    ):
        if hidden_dim % num_heads:
            raise ValueError(
                f"`hidden_dim` ({hidden_dim}) must be divisible by `num_heads` ({num_heads})."
            )
        # === Layers ===
        self.token_embedding = token_embedding(vocabulary_size, hidden_dim, tie_embeddings, dtype)
        self.embeddings_dropout = keras.layers.Dropout(
            dropout, dtype=dtype, name="embeddings_dropout"
        )
        self.feedback_stack = FeedbackStack(
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_dim=intermediate_dim,
            max_sequence_length=max_sequence_length,
            activation=activation,
            dropout=dropout,
            shared_kv=shared_kv,
            memory_window=memory_window,
            layer_norm_epsilon=layer_norm_epsilon,
            kernel_initializer=normal_initializer(),
            use_dconv=use_dconv,
            kernel_size=kernel_size,
            dtype=dtype,
            name="feedback_stack",
        )
        self.layer_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="layer_norm"
        )

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = self.embed(token_ids)
        x = self.feedback_stack(x, padding_mask=padding_mask)
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
        self.activation = get_activation(activation)
        self.shared_kv = shared_kv
        self.memory_window = memory_window
        self.layer_norm_epsilon = layer_norm_epsilon
        self.tie_embeddings = tie_embeddings
        self.use_dconv = use_dconv
        self.kernel_size = kernel_size

    @property
    def head_dim(self) -> int:
        return self.hidden_dim // self.num_heads

    def embed(self, token_ids, training=None):
        """Token embeddings (then dropout); there are no absolute positions."""
        return self.embeddings_dropout(self.token_embedding(token_ids), training=training)

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
                "activation": serialize_activation(self.activation),
                "shared_kv": self.shared_kv,
                "memory_window": self.memory_window,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "tie_embeddings": self.tie_embeddings,
                "use_dconv": self.use_dconv,
                "kernel_size": self.kernel_size,
            }
        )
        return config
