"""Learned absolute position embedding whose positions skip padding."""

import keras
from keras import ops

from keras_primer.layers.cache_utils import position_ids_from_mask


@keras.saving.register_keras_serializable(package="keras_primer")
class PaddingAwarePositionEmbedding(keras.layers.Layer):
    """Embeds positions `cumsum(padding_mask) - 1` (or `start_index + i`).

    With left padding the first real token gets position 0, so a left-padded
    row computes what the same row computes unpadded.

    Args:
        sequence_length: Number of positions (the model's maximum length).
        initializer: Initializer of the embedding table.

    Example:

    >>> import numpy as np
    >>> embedding = PaddingAwarePositionEmbedding(sequence_length=8)
    >>> ids = np.zeros((2, 5), "int32")
    >>> mask = np.array([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], "bool")
    >>> tuple(embedding(np.ones((2, 5, 4), "float32"), padding_mask=mask).shape)
    (2, 5, 4)
    """

    def __init__(self, sequence_length: int, initializer="glorot_uniform", **kwargs):
        super().__init__(**kwargs)
        self.sequence_length = int(sequence_length)
        self.initializer = keras.initializers.get(initializer)

    def build(self, inputs_shape):
        self.embeddings = self.add_weight(
            name="embeddings",
            shape=[self.sequence_length, inputs_shape[-1]],
            initializer=self.initializer,
        )
        self.built = True

    def call(self, inputs, padding_mask=None, start_index=0):
        """Position embeddings for `inputs` (`[batch, length, hidden]`).

        Args:
            inputs: Token embeddings; only the shape is used.
            padding_mask: Optional `[batch, full_length]` mask. Positions of
                `inputs` are `start_index .. start_index + length - 1` in it.
            start_index: Position of `inputs[:, 0]`.
        """
        length = ops.shape(inputs)[1]
        positions = ops.arange(length, dtype="int32") + ops.cast(start_index, "int32")
        if padding_mask is None:
            position_ids = positions[None, :]
        else:
            position_ids = ops.take(position_ids_from_mask(padding_mask), positions, axis=1)
        embeddings = ops.take(ops.cast(self.embeddings, self.compute_dtype), position_ids, axis=0)
        return ops.broadcast_to(embeddings, ops.shape(inputs))

    def compute_output_shape(self, inputs_shape):
        return inputs_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "sequence_length": self.sequence_length,
                "initializer": keras.initializers.serialize(self.initializer),
            }
        )
        return config
