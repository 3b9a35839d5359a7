"""keras-primer: Primer EZ and Feedback Transformer for every Keras backend."""

# Registers what a compiled `.keras` file written by `keras-primer train`
# references beyond the models: the optimizer (its schedule is Keras' own).
# Without it, `keras.saving.load_model` fails with "Could not locate class 'AdamW'".
import keras_primer.training.optimizer  # noqa: E402, F401  (registration only)
from keras_primer.activations import squared_relu

# Registers the SentencePiece tokenizer, so `.keras` files that use it load.
from keras_primer.data.tokenizers import PrimerSentencePieceTokenizer

# Registers the sampler a compiled causal LM may hold (`compile(sampler=...)`).
from keras_primer.generation import ContractSampler
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

__version__ = "0.1.0"
