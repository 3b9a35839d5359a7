from keras_primer.models.feedback.feedback_backbone import FeedbackBackbone
from keras_primer.models.feedback.feedback_causal_lm import FeedbackCausalLM
from keras_primer.models.feedback.feedback_causal_lm_preprocessor import (
    FeedbackCausalLMPreprocessor,
)
from keras_primer.models.feedback.feedback_tokenizer import FeedbackTokenizer
