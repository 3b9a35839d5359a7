"""Primer EZ (So et al. 2021) and the Transformer baseline it is measured against.

`MultiDConvHeadAttention` (causal depthwise convolutions after Q, K and V)
and `PrimerDecoderBlock` (its two switches: the activation and the
convolutions), the backbone, the causal LM and its preprocessor.
"""

from keras_primer.models.primer.multi_dconv_head_attention import MultiDConvHeadAttention
from keras_primer.models.primer.primer_backbone import PrimerBackbone
from keras_primer.models.primer.primer_causal_lm import PrimerCausalLM
from keras_primer.models.primer.primer_causal_lm_preprocessor import PrimerCausalLMPreprocessor
from keras_primer.models.primer.primer_decoder_block import PrimerDecoderBlock
