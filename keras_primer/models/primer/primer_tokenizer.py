"""The Primer byte tokenizer; defined with every tokenizer in `keras_primer.tokenizers`."""

from keras_primer.tokenizers import END_TOKEN, PAD_TOKEN, START_TOKEN, PrimerTokenizer

__all__ = ["END_TOKEN", "PAD_TOKEN", "START_TOKEN", "PrimerTokenizer"]
