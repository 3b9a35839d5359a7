#!/usr/bin/env python
"""Thin entry point: same as `keras-primer export MODEL.keras --out DIR ...`.

python export/export_model.py model.keras --out exported --name primer --version 1 --int8
"""

import sys

from keras_primer_cli.export import main

if __name__ == "__main__":
    sys.exit(main())
