"""Presets, optimizer, callbacks, the training driver, comparison and distribution.

Importing this package (which `import keras_primer` does, for the optimizer
that compiled `.keras` files name) loads only the light modules: the run
settings (`RunConfig`, presets; declared in `keras_primer_cli`) and the
optimizer. Models are built from the registry (`keras_primer.models.registry`).
The driver (`train`) and its fit loop (`plan_segments`) load on first use of
those names, so the run folder and the data pipeline stay out of a program
that only builds or loads models. No module here imports TensorFlow (only
the `mirrored` distribution and `to_tf_dataset` do).
"""

import importlib

from keras_primer.training.optimizer import build_optimizer, learning_rate_schedule
from keras_primer_cli.presets import PRESETS, TrainPreset, get_preset
from keras_primer_cli.run_config import RunConfig

# Names of the training pipeline and the module of each, loaded when first used (PEP 562).
_PIPELINE_NAMES = {
    "plan_segments": "keras_primer.training.fit_loop",
    "train": "keras_primer.training.driver",
}

__all__ = [
    "PRESETS",
    "RunConfig",
    "TrainPreset",
    "build_optimizer",
    "get_preset",
    "learning_rate_schedule",
    *_PIPELINE_NAMES,
]


def __getattr__(name: str):
    if name in _PIPELINE_NAMES:
        return getattr(importlib.import_module(_PIPELINE_NAMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
