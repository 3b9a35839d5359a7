"""`python -m keras_primer.export MODEL.keras --out DIR` (same as `keras-primer export`)."""

import sys

from keras_primer_runtime.export_cli import main

sys.exit(main())
