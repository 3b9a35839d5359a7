"""Strings to `(x, y, sample_weight)` for the Feedback causal LM."""

import keras
from keras_hub.models import CausalLMPreprocessor

from keras_primer.models.feedback.feedback_backbone import FeedbackBackbone
from keras_primer.tokenizers import FeedbackTokenizer


@keras.saving.register_keras_serializable(package="keras_primer")
class FeedbackCausalLMPreprocessor(CausalLMPreprocessor):
    """Tokenizes, adds start/end tokens, pads to `sequence_length`, and shifts.

    Same behaviour as `PrimerCausalLMPreprocessor` (byte tokens, right
    padding); `x = {"token_ids", "padding_mask"}`, labels `y` shifted left by
    one, `sample_weight` 0 on padding.

    Args:
        tokenizer: A `FeedbackTokenizer` (or `PrimerTokenizer`).
        sequence_length: Length of the packed sequences.
        add_start_token: Prepend the start token.
        add_end_token: Append the end token.

    Example:

    >>> preprocessor = FeedbackCausalLMPreprocessor(FeedbackTokenizer(), sequence_length=8)
    >>> x, y, sample_weight = preprocessor(["Hi!"])
    >>> [int(i) for i in x["token_ids"][0]]
    [2, 72, 105, 33, 3, 0, 0, 0]
    """

    backbone_cls = FeedbackBackbone
    tokenizer_cls = FeedbackTokenizer
