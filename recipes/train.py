"""Train a causal LM: the same flags as `keras-primer train`.

    python recipes/train.py --model primer_ez --out runs/shakespeare --preset shakespeare_char
    python recipes/train.py --model transformer --data corpus/ --tokenizer sentencepiece --out runs/spm

Pass `--backend jax|tensorflow|torch` (or set KERAS_BACKEND).
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from keras_primer.training.command import main

    sys.exit(main(sys.argv[1:]))
