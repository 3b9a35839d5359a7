"""`python -m keras_primer.export MODEL.keras --out DIR` (same as `keras-primer export`)."""

import sys

from keras_primer.export.command import main

sys.exit(main())
