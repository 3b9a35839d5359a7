"""Train a causal LM: the same flags as `keras-primer train`.

    python -m recipes.train --model primer_ez --out runs/shakespeare --preset shakespeare_char
    python -m recipes.train --model transformer --data corpus/ --tokenizer sentencepiece --out runs/spm

Pass `--backend jax|tensorflow|torch` (or set KERAS_BACKEND). Run from the
repository root (or with keras-primer installed).
"""

import sys

from keras_primer_cli.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
