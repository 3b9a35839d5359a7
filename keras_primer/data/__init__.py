"""Corpus loading, SentencePiece training, token splits and streaming input.

The pipeline's names (`load_splits`, `WindowDataset`, ...) load on first
use (PEP 562): `import keras_primer` needs the tokenizers, not the pipeline.
"""

import importlib

from keras_primer.data.corpus import (
    SHAKESPEARE_ENV,
    SHAKESPEARE_URL,
    DataFileError,
    iter_text_chunks,
    list_text_files,
    read_text,
    shakespeare_path,
)
from keras_primer.data.sentencepiece_training import train_sentencepiece

# Names of `keras_primer.data.pipeline`, loaded when first used.
_PIPELINE_NAMES = (
    "TokenSplits",
    "WindowDataset",
    "bits_per_character",
    "check_token_cache",
    "content_fingerprint",
    "encode_corpus",
    "load_splits",
    "make_windows",
    "to_tf_dataset",
    "validation_arrays",
)


def __getattr__(name: str):
    if name in _PIPELINE_NAMES:
        return getattr(importlib.import_module("keras_primer.data.pipeline"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PIPELINE_NAMES))
