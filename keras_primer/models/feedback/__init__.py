"""The Feedback Transformer (Fan et al. 2020).

`FeedbackAttention` (a layer's attention over the memory of past steps),
`FeedbackStack` (the time loop and the softmax-mixed memory, with its
memory-saving custom gradients in `feedback_time_loop`), the backbone, the
causal LM and its preprocessor.
"""

from keras_primer.models.feedback.feedback_attention import FeedbackAttention
from keras_primer.models.feedback.feedback_backbone import FeedbackBackbone
from keras_primer.models.feedback.feedback_causal_lm import FeedbackCausalLM
from keras_primer.models.feedback.feedback_causal_lm_preprocessor import (
    FeedbackCausalLMPreprocessor,
)
from keras_primer.models.feedback.feedback_stack import FeedbackStack
