"""Presets, optimizer, callbacks, the training driver, comparison and distribution.

Importing this package does not import TensorFlow (only the `mirrored`
distribution and `to_tf_dataset` do).
"""

from keras_primer.training.driver import RunConfig, plan_segments, train
from keras_primer.training.models import MODELS, build_backbone, build_causal_lm
from keras_primer.training.optimizer import build_optimizer, learning_rate_schedule
from keras_primer.training.presets import PRESETS, TrainPreset, get_preset
