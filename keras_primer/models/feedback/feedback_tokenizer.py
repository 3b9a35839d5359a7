"""The Feedback Transformer's byte tokenizer; defined with every tokenizer in
`keras_primer.tokenizers`."""

from keras_primer.tokenizers import FeedbackTokenizer

__all__ = ["FeedbackTokenizer"]
