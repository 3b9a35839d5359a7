"""The Keras side of the generation contract (`keras_primer_runtime.generation`).

* `samplers`: the next-token distribution with `keras.ops`
  (`filtered_probabilities`, also used by the SavedModel's loop), the
  contract's keras-hub sampler (`ContractSampler`, the default of
  `compile`) and the check of any keras-hub sampler (`check_sampler`).
* `causal_lm_generation`: what every causal LM's `generate` shares: the
  input checks (`GenerateInputChecks`) and the post-processing
  (`finish_generation`).
"""

from keras_primer.generation.causal_lm_generation import GenerateInputChecks, finish_generation
from keras_primer.generation.samplers import (
    ContractSampler,
    check_sampler,
    filtered_probabilities,
    get_sampler,
)
