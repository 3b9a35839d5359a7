"""Alias of `keras_primer_runtime.cli` (the `keras-primer` command), kept for old imports."""

import sys

from keras_primer_runtime.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
