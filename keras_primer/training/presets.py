"""Model sizes and training budgets, by name.

Declared in `keras_primer_runtime.run_config` (framework-free, so the
`keras-primer train` parser can list them without Keras) and re-exported here.
"""

from keras_primer_runtime.run_config import PRESETS, TrainPreset, get_preset

__all__ = ["PRESETS", "TrainPreset", "get_preset"]
