"""Byte tokenizer of the Feedback Transformer (the Primer byte tokenizer)."""

import keras

from keras_primer.models.feedback.feedback_backbone import FeedbackBackbone
from keras_primer.models.primer.primer_tokenizer import PrimerTokenizer


@keras.saving.register_keras_serializable(package="keras_primer")
class FeedbackTokenizer(PrimerTokenizer):
    """`PrimerTokenizer` (UTF-8 bytes, vocabulary 256) bound to `FeedbackBackbone`.

    Identical behaviour; the subclass only lets keras-hub presets of a
    `FeedbackBackbone` find their tokenizer class.

    Example:

    >>> tokenizer = FeedbackTokenizer()
    >>> [int(i) for i in tokenizer("Hi!")]
    [72, 105, 33]
    """

    backbone_cls = FeedbackBackbone
