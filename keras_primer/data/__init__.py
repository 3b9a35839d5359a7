"""Corpus loading, tokenization (bytes, SentencePiece), splits and streaming input."""

from keras_primer.data.corpus import (
    SHAKESPEARE_ENV,
    SHAKESPEARE_URL,
    DataFileError,
    iter_text_chunks,
    list_text_files,
    read_text,
    shakespeare_path,
)
from keras_primer.data.pipeline import (
    TokenSplits,
    WindowDataset,
    bits_per_character,
    content_fingerprint,
    encode_corpus,
    load_splits,
    make_windows,
    to_tf_dataset,
    validation_arrays,
)
from keras_primer.data.tokenizers import (
    ByteCodec,
    PrimerSentencePieceTokenizer,
    SentencePieceCodec,
    keras_tokenizer,
    train_sentencepiece,
)
