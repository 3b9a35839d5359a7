"""Layers: causal depthwise convolution, MDHA, feed-forward, decoder block,
feedback attention and the feedback stack."""

from keras_primer.layers.causal_depthwise_conv import (
    CausalDepthwiseConv,
    CausalSmoothingInitializer,
)
from keras_primer.layers.decoder_block import PrimerDecoderBlock
from keras_primer.layers.feed_forward import FeedForward
from keras_primer.layers.feedback_attention import FeedbackAttention
from keras_primer.layers.feedback_stack import FeedbackStack
from keras_primer.layers.multi_dconv_head_attention import MultiDConvHeadAttention

__all__ = [
    "CausalDepthwiseConv",
    "CausalSmoothingInitializer",
    "FeedbackAttention",
    "FeedbackStack",
    "FeedForward",
    "MultiDConvHeadAttention",
    "PrimerDecoderBlock",
]
