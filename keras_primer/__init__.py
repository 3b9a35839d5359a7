"""keras-primer: Primer EZ and Feedback Transformer for every Keras backend."""

from keras_primer.activations import squared_relu
from keras_primer.layers import (
    CausalDepthwiseConv,
    FeedForward,
    MultiDConvHeadAttention,
    PrimerDecoderBlock,
)
from keras_primer.models.primer import (
    PrimerBackbone,
    PrimerCausalLM,
    PrimerCausalLMPreprocessor,
    PrimerTokenizer,
)

__version__ = "0.1.0"
