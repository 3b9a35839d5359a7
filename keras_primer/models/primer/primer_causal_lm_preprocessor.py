"""Strings to `(x, y, sample_weight)` for causal language modelling."""

import keras
from keras_hub.models import CausalLMPreprocessor

from keras_primer.models.primer.primer_backbone import PrimerBackbone
from keras_primer.tokenizers import PrimerTokenizer


@keras.saving.register_keras_serializable(package="keras_primer")
class PrimerCausalLMPreprocessor(CausalLMPreprocessor):
    """Tokenizes, adds start/end tokens, pads to `sequence_length`, and shifts.

    Calling it on strings returns `x = {"token_ids", "padding_mask"}`, labels
    `y` (the ids shifted left by one) and `sample_weight` (0 on padding).
    Longer texts are cut to `sequence_length` here, the training-data
    convention of keras-hub; `generate()` never cuts a prompt.

    Args:
        tokenizer: A `PrimerTokenizer`.
        sequence_length: Length of the packed sequences.
        add_start_token: Prepend the start token.
        add_end_token: Append the end token.

    Example:

    >>> preprocessor = PrimerCausalLMPreprocessor(PrimerTokenizer(), sequence_length=8)
    >>> x, y, sample_weight = preprocessor(["Hi!"])
    >>> [int(i) for i in x["token_ids"][0]]
    [2, 72, 105, 33, 3, 0, 0, 0]
    """

    backbone_cls = PrimerBackbone
    tokenizer_cls = PrimerTokenizer
