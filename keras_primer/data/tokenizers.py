"""Text codecs: byte-level and SentencePiece, with the ids the causal LM needs.

A codec turns corpus text into NumPy token ids (fast, no TensorFlow) and
builds the matching keras-hub tokenizer for the model's preprocessor
(`generate()` on strings). Both codecs use the same special ids:
pad 0, start 2, end 3 (SentencePiece also has unk 1).
"""

from __future__ import annotations

import hashlib
import io
import os
import re

import keras
import numpy as np
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_primer_runtime.run_config import MIN_SENTENCEPIECE_VOCABULARY

PAD_ID, UNK_ID, START_ID, END_ID = 0, 1, 2, 3


@keras.saving.register_keras_serializable(package="keras_primer")
class PrimerSentencePieceTokenizer(SentencePieceTokenizer):
    """A keras-hub `SentencePieceTokenizer` with start/end/pad tokens.

    Works with a model trained by `train_sentencepiece` (pieces `<pad>` = 0,
    `<unk>` = 1, `<s>` = 2, `</s>` = 3), so `PrimerCausalLMPreprocessor` can
    use it in place of the byte tokenizer. The proto is saved with the model
    (`.keras` assets). Import `keras_primer.data` before loading such a model.
    """

    def __init__(self, proto=None, **kwargs):
        self._add_special_token("<s>", "start_token")
        self._add_special_token("</s>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        super().__init__(proto=proto, **kwargs)


class ByteCodec:
    """UTF-8 bytes as ids (vocabulary 256), like `PrimerTokenizer`."""

    kind = "bytes"
    vocabulary_size = 256
    start_id, end_id, pad_id = START_ID, END_ID, PAD_ID
    token_dtype = np.uint8

    def encode(self, text: str) -> np.ndarray:
        """`text` as a 1-D array of byte ids."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        """Byte ids back to text (invalid UTF-8 becomes U+FFFD)."""
        return bytes(np.asarray(ids, dtype=np.uint8).tolist()).decode("utf-8", "replace")

    def keras_tokenizer(self):
        """The model-side tokenizer (`PrimerTokenizer`)."""
        from keras_primer.models.primer import PrimerTokenizer

        return PrimerTokenizer()

    def describe(self) -> dict:
        """What must match when a run resumes."""
        return {"kind": self.kind, "vocabulary_size": self.vocabulary_size}


class SentencePieceCodec:
    """A SentencePiece model (a serialized proto) as a codec.

    Args:
        proto: The model proto bytes, or the path of a `.model` file.
    """

    kind = "sentencepiece"
    start_id, end_id, pad_id = START_ID, END_ID, PAD_ID

    def __init__(self, proto: bytes | str):
        import sentencepiece as spm

        if isinstance(proto, str):
            if not os.path.isfile(proto):
                raise ValueError(f"SentencePiece model not found: {proto}.")
            with open(proto, "rb") as f:
                proto = f.read()
        self.proto = bytes(proto)
        self.processor = spm.SentencePieceProcessor(model_proto=self.proto)
        self.vocabulary_size = int(self.processor.vocab_size())
        expected = {"<pad>": PAD_ID, "<s>": START_ID, "</s>": END_ID}
        for piece, wanted in expected.items():
            got = self.processor.piece_to_id(piece)
            if got != wanted:
                raise ValueError(
                    f"The SentencePiece model must map {piece!r} to id {wanted} "
                    f"(it maps it to {got}). Train it with `train_sentencepiece`, "
                    "or with pad_id=0, unk_id=1, bos_id=2, eos_id=3 and pieces "
                    "<pad>, <unk>, <s>, </s>."
                )
        self.token_dtype = np.uint16 if self.vocabulary_size <= 65536 else np.int32

    def encode(self, text: str) -> np.ndarray:
        """`text` as a 1-D array of piece ids (no start/end ids added)."""
        return np.asarray(self.processor.encode(text), dtype=self.token_dtype)

    def decode(self, ids) -> str:
        """Piece ids back to text."""
        return self.processor.decode([int(i) for i in np.asarray(ids).reshape(-1)])

    def keras_tokenizer(self) -> PrimerSentencePieceTokenizer:
        """The model-side tokenizer (needs tensorflow-text)."""
        return PrimerSentencePieceTokenizer(proto=self.proto)

    def describe(self) -> dict:
        """What must match when a run resumes (vocabulary size and a hash of the model)."""
        return {
            "kind": self.kind,
            "vocabulary_size": self.vocabulary_size,
            "sha256": hashlib.sha256(self.proto).hexdigest()[:16],
        }


def _iter_lines(files: list[str]):
    """The corpus line by line (without line ends), file after file."""
    for name in files:
        with open(name, encoding="utf-8", errors="replace", newline="") as f:
            for line in f:
                yield line.rstrip("\r\n")


def _vocabulary_error(message: str, vocabulary_size: int, num_files: int) -> str:
    """SentencePiece's vocabulary errors as the size that would work."""
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
