"""Presets, optimizer, callbacks, the training driver, comparison and distribution.

Importing this package (which `import keras_primer` does, for the optimizer
that compiled `.keras` files name) loads only the light modules: the run
settings (`RunConfig`, presets; declared in `keras_primer_cli`) and the
optimizer. Models are built from the registry (`keras_primer.models.registry`). The driver (`train`, `plan_segments`)
loads on first use of those names, so the run folder and the data pipeline
stay out of a program that only builds or loads models. No module here
imports TensorFlow (only the `mirrored` distribution and `to_tf_dataset` do).
"""

import importlib

from keras_primer.training.optimizer import build_optimizer, learning_rate_schedule
from keras_primer_cli.presets import PRESETS, TrainPreset, get_preset
from keras_primer_cli.run_config import RunConfig

# Names of the driver, loaded when first used (PEP 562).
_DRIVER_NAMES = ("plan_segments", "train")

__all__ = [
    "PRESETS",
    "RunConfig",
    "TrainPreset",
    "build_optimizer",
    "get_preset",
    "learning_rate_schedule",
    *_DRIVER_NAMES,
]


def __getattr__(name: str):
    if name in _DRIVER_NAMES:
        return getattr(importlib.import_module("keras_primer.training.driver"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
