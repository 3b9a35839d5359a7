"""SentencePiece training on a corpus, with keras-primer's special ids.

`train_sentencepiece` returns the runtime's `SentencePieceCodec`
(`keras_primer_runtime.generation`), the one codec per tokenizer kind that
corpus encoding, the ONNX Runtime generator and the tests use; its ids are
pad 0, unk 1, start 2, end 3.
"""

from __future__ import annotations

import io
import os
import re

from keras_primer_cli.run_config import MIN_SENTENCEPIECE_VOCABULARY
from keras_primer_runtime.generation import END_ID, PAD_ID, START_ID, UNK_ID, SentencePieceCodec

__all__ = ["train_sentencepiece"]

# The longest line SentencePiece learns from (its `max_sentence_length`, in bytes).
MAX_LINE_BYTES = 4192


def _iter_lines(files: list[str]):
    """The corpus line by line (without line ends), file after file."""
    for name in files:
        with open(name, encoding="utf-8", errors="replace", newline="") as f:
            for line in f:
                yield line.rstrip("\r\n")


def _vocabulary_error(message: str, vocabulary_size: int, num_files: int) -> str:
    """SentencePiece's errors as what is wrong and what to do (for a vocabulary
    error: the size that would work)."""
    if "sentences_.empty()" in message:
        return (
            f"Too little text for SentencePiece: the corpus ({num_files} file(s)) has no line "
            f"it can learn from (it reads the text line by line and skips empty lines and "
            f"lines longer than {MAX_LINE_BYTES} bytes). Use more text on more, shorter "
            "lines, or --tokenizer bytes."
        )
    too_small = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if too_small:
        return (
            f"A SentencePiece vocabulary of {vocabulary_size} is too small for this corpus: "
            f"its characters and the special and byte pieces need at least "
            f"{too_small.group(2)}. Pass --vocab-size {too_small.group(2)} or more."
        )
    too_large = re.search(
        r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)", message
    )
    if too_large:
        return (
            f"A SentencePiece vocabulary of {vocabulary_size} is too large for this corpus: "
            f"it has at most {too_large.group(2)} distinct pieces. Pass --vocab-size "
            f"{too_large.group(2)} or less, or use more text."
        )
    return (
        f"SentencePiece could not train a {vocabulary_size}-piece model on {num_files} "
        f"file(s): {message.strip()}"
    )


def train_sentencepiece(
    files: list[str],
    vocabulary_size: int,
    model_path: str | None = None,
    model_type: str = "bpe",
    max_sentences: int = 1_000_000,
    seed: int = 0,
) -> SentencePieceCodec:
    """Trains a SentencePiece model on `files` and returns its codec.

    Text is kept as is (no normalization, spaces and newlines preserved,
    byte fallback for unseen characters), so `decode(encode(text)) == text`.
    At most `max_sentences` lines, sampled at random, are read, so the
    corpus need not fit in memory.

    Args:
        files: Text files (`list_text_files`).
        vocabulary_size: Pieces in the model, including the 4 special ones
            and the 256 byte-fallback pieces; at least 300.
        model_path: Where to write the `.model` file (None: don't write).
        model_type: `"bpe"` or `"unigram"`.
        max_sentences: Lines sampled for training.
        seed: Sampling seed.

    Raises:
        ValueError: `vocabulary_size` is below 300, or too small or too large
            for this corpus (the message gives the size that works).
    """
    import sentencepiece as spm

    if vocabulary_size < MIN_SENTENCEPIECE_VOCABULARY:
        raise ValueError(
            f"`vocabulary_size` must be at least {MIN_SENTENCEPIECE_VOCABULARY} (4 special pieces, 256 byte "
            f"fallbacks and some merges). Received: {vocabulary_size}."
        )
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"`model_type` must be 'bpe' or 'unigram'. Received: {model_type!r}.")
    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    try:
        # Lines through an iterator, not `input=",".join(files)`: a comma in
        # a path would split it in two.
        spm.SentencePieceTrainer.train(
            sentence_iterator=_iter_lines(files),
            model_writer=writer,
            vocab_size=vocabulary_size,
            model_type=model_type,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=START_ID,
            eos_id=END_ID,
            pad_piece="<pad>",
            unk_piece="<unk>",
            bos_piece="<s>",
            eos_piece="</s>",
            user_defined_symbols=["\n"],
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            byte_fallback=True,
            split_digits=True,
            character_coverage=1.0,
            input_sentence_size=max_sentences,
            max_sentence_length=MAX_LINE_BYTES,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(_vocabulary_error(str(e), vocabulary_size, len(files))) from None
    proto = writer.getvalue()
    if model_path:
        os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
        with open(model_path, "wb") as f:
            f.write(proto)
    return SentencePieceCodec(proto)
