"""keras-primer: Primer EZ and Feedback Transformer for every Keras backend.

`import keras_primer` loads the layers, the models, the tokenizers and the
samplers, which is everything a `.keras` file can name, and not the data
pipeline or the training driver.
"""

# Registers what a compiled `.keras` file written by `keras-primer train`
# references beyond the models: the optimizer (its schedule is Keras' own).
# Without it, `keras.saving.load_model` fails with "Could not locate class 'AdamW'".
import keras_primer.training.optimizer  # noqa: E402, F401  (registration only)
from keras_primer.activations import squared_relu

# Registers the sampler a compiled causal LM may hold (`compile(sampler=...)`).
from keras_primer.generation import ContractSampler
from keras_primer.layers import CausalDepthwiseConv, FeedForward
from keras_primer.models.feedback import (
    FeedbackAttention,
    FeedbackBackbone,
    FeedbackCausalLM,
    FeedbackCausalLMPreprocessor,
    FeedbackStack,
)
from keras_primer.models.primer import (
    MultiDConvHeadAttention,
    PrimerBackbone,
    PrimerCausalLM,
    PrimerCausalLMPreprocessor,
    PrimerDecoderBlock,
)
from keras_primer.tokenizers import FeedbackTokenizer, PrimerSentencePieceTokenizer, PrimerTokenizer

__version__ = "0.1.0"
