"""Layers both model families use: the causal depthwise convolution, the
feed-forward block, the pre-norm residual, embeddings and cache helpers.

Each paper's own layers live in its model folder: multi-DConv-head
attention and the Primer decoder block in `keras_primer.models.primer`, the
feedback attention and the feedback stack in `keras_primer.models.feedback`.
"""

from keras_primer.layers.causal_depthwise_conv import (
    CausalDepthwiseConv,
    CausalSmoothingInitializer,
)
from keras_primer.layers.feed_forward import FeedForward

__all__ = ["CausalDepthwiseConv", "CausalSmoothingInitializer", "FeedForward"]
