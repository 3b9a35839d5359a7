"""`keras-primer train` from the Keras side: the front end lives in
`keras_primer_runtime.train_cli` (framework-free, fast `--help`).

Kept so `keras_primer.training.command.main` and `build_parser` still work.
"""

from keras_primer_runtime.run_config import build_train_parser as build_parser
from keras_primer_runtime.run_config import config_from_args
from keras_primer_runtime.train_cli import main

__all__ = ["build_parser", "config_from_args", "main"]
