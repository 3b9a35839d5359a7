"""keras-primer: Primer EZ and Feedback Transformer for every Keras backend."""

from keras_primer.activations import squared_relu
from keras_primer.layers import (
    CausalDepthwiseConv,
    FeedbackAttention,
    FeedbackStack,
    FeedForward,
    MultiDConvHeadAttention,
    PrimerDecoderBlock,
)
from keras_primer.models.feedback import (
    FeedbackBackbone,
    FeedbackCausalLM,
    FeedbackCausalLMPreprocessor,
    FeedbackTokenizer,
)
from keras_primer.models.primer import (
    PrimerBackbone,
    PrimerCausalLM,
    PrimerCausalLMPreprocessor,
    PrimerTokenizer,
)

# Registers the SentencePiece tokenizer, so `.keras` files that use it load.
from keras_primer.data.tokenizers import PrimerSentencePieceTokenizer

__version__ = "0.1.0"
