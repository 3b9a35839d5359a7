"""Byte-level tokenizer with start, end and padding tokens."""

import keras
from keras_hub.tokenizers import ByteTokenizer

from keras_primer.models.primer.primer_backbone import PrimerBackbone

START_TOKEN = "\x02"  # ASCII STX
END_TOKEN = "\x03"  # ASCII ETX
PAD_TOKEN = "\x00"  # ASCII NUL, id 0


@keras.saving.register_keras_serializable(package="keras_primer")
class PrimerTokenizer(ByteTokenizer):
    """UTF-8 bytes as token ids (vocabulary 256), case preserved.

    Id 0 pads, the control bytes STX (2) and ETX (3) start and end a sequence.
    Text that itself contains those bytes is tokenized to the same ids. No
    vocabulary file is needed, so `save_assets` writes nothing and
    `load_preset_assets` reads nothing. TensorFlow is used inside `tf.data`
    pipelines; elsewhere tokenization runs in Python.

    Example:

    >>> tokenizer = PrimerTokenizer()
    >>> [int(i) for i in tokenizer("Hi!")]
    [72, 105, 33]
    >>> tokenizer.detokenize([72, 105, 33])
    'Hi!'
    """

    backbone_cls = PrimerBackbone

    def __init__(self, lowercase: bool = False, **kwargs):
        self._add_special_token(START_TOKEN, "start_token")
        self._add_special_token(END_TOKEN, "end_token")
        self._add_special_token(PAD_TOKEN, "pad_token")
        super().__init__(lowercase=lowercase, **kwargs)

    def save_assets(self, dir_path: str) -> None:
        """Byte-level: there is no vocabulary file to save."""

    def load_preset_assets(self, preset) -> None:
        """Byte-level: there is no vocabulary file to load."""
