"""The tokenizer description that travels with an export, and its codecs.

`TokenizerSpec` describes a tokenizer as exported; the one codec per kind
built from it (`ByteCodec`, `SentencePieceCodec`, `make_codec`) turns text
into ids and back in ONNX Runtime, in corpus encoding and in the tests.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field

import numpy as np

from keras_primer_runtime.generation.prompts import check_prompt_tokens, check_text

TOKENIZER_KINDS = ("bytes", "sentencepiece")
TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"


@dataclass(frozen=True)
class TokenizerSpec:
    """What a runtime needs to turn text into ids and back, as exported.

    `kind` is `"bytes"` (UTF-8 bytes are ids) or `"sentencepiece"` (the model
    proto travels beside it as `tokenizer.model`). Special ids are removed
    from decoded text; `add_start_token` prepends `start_id` to a prompt.

    >>> TokenizerSpec("bytes", 256, start_id=2, end_id=3, pad_id=0).special_ids
    [0, 2, 3]
    """

    kind: str
    vocabulary_size: int
    start_id: int
    end_id: int
    pad_id: int
    add_start_token: bool = True
    extra_special_ids: tuple = field(default=())

    def __post_init__(self):
        if self.kind not in TOKENIZER_KINDS:
            raise ValueError(
                f"Unknown tokenizer kind {self.kind!r}; the exporters know {TOKENIZER_KINDS}."
            )

    @property
    def special_ids(self) -> list[int]:
        """Ids never shown in decoded text."""
        return sorted({self.start_id, self.end_id, self.pad_id, *self.extra_special_ids})

    def to_json(self) -> dict:
        """JSON-able dict (`from_json` reads it back)."""
        data = asdict(self)
        data["extra_special_ids"] = list(self.extra_special_ids)
        data["special_ids"] = self.special_ids
        return data

    @classmethod
    def from_json(cls, data: dict) -> TokenizerSpec:
        """The spec written by `to_json`."""
        data = {k: v for k, v in data.items() if k != "special_ids"}
        data["extra_special_ids"] = tuple(data.get("extra_special_ids", ()))
        return cls(**data)

    def save(self, directory: str, proto: bytes | None = None) -> list[str]:
        """Writes `tokenizer.json` (and `tokenizer.model` for SentencePiece);
        returns the paths written."""
        if (self.kind == "sentencepiece") != (proto is not None):
            raise ValueError("A SentencePiece spec needs its model proto; a byte spec has none.")
        paths = [os.path.join(directory, TOKENIZER_FILE)]
        with open(paths[0], "w") as f:
            json.dump(self.to_json(), f, indent=2)
        if proto is not None:
            paths.append(os.path.join(directory, SENTENCEPIECE_FILE))
            with open(paths[1], "wb") as f:
                f.write(proto)
        return paths


#: The ids every keras-primer tokenizer uses (SentencePiece also has unk 1).
PAD_ID, UNK_ID, START_ID, END_ID = 0, 1, 2, 3


def byte_spec(add_start_token: bool = True) -> TokenizerSpec:
    """The description of the byte tokenizer (UTF-8 bytes are ids 0-255).

    >>> byte_spec().special_ids
    [0, 2, 3]
    """
    return TokenizerSpec("bytes", 256, START_ID, END_ID, PAD_ID, add_start_token)


class ByteCodec:
    """UTF-8 bytes as ids (vocabulary 256): the one byte codec.

    Corpus encoding (`keras_primer.data`), the ONNX Runtime generator and the
    tests all use this class; the Keras tokenizer (`keras_primer.tokenizers.
    PrimerTokenizer`) describes itself with the same `TokenizerSpec`.

    >>> codec = ByteCodec()
    >>> codec.encode("Hi").tolist(), codec.decode([2, 72, 105, 3])
    ([72, 105], 'Hi')
    """

    kind = "bytes"
    vocabulary_size = 256
    start_id, end_id, pad_id = START_ID, END_ID, PAD_ID
    token_dtype = np.uint8

    def __init__(self, spec: TokenizerSpec | None = None):
        spec = spec or byte_spec()
        if spec.kind != "bytes" or spec.vocabulary_size != 256:
            raise ValueError(f"A byte codec needs a byte spec of 256 ids. Received: {spec}")
        self.spec = spec
        self.start_id, self.end_id, self.pad_id = spec.start_id, spec.end_id, spec.pad_id

    def encode(self, text: str) -> np.ndarray:
        """`text` as a 1-D array of byte ids (no start/end ids added).

        Lone surrogates raise `ValueError` (the Unicode rule, `check_text`).
        """
        return np.frombuffer(check_text(text).encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        """Text of `ids`, special ids removed (invalid UTF-8 becomes U+FFFD)."""
        special = set(self.spec.special_ids)
        kept = bytes(int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in special)
        return kept.decode("utf-8", "replace")

    def describe(self) -> dict:
        """What must match when a run resumes or a token cache is reused."""
        return {"kind": self.kind, "vocabulary_size": self.vocabulary_size}


class SentencePieceCodec:
    """A SentencePiece model proto as a codec: the one SentencePiece codec.

    Args:
        proto: The model proto bytes, or the path of a `.model` file.
        spec: Its description, as exported (default: the keras-primer ids
            pad 0, unk 1, start 2, end 3, which the model must use).
    """

    kind = "sentencepiece"

    def __init__(self, proto: bytes | str, spec: TokenizerSpec | None = None):
        import sentencepiece

        if isinstance(proto, str):
            if not os.path.isfile(proto):
                raise ValueError(f"SentencePiece model not found: {proto}.")
            with open(proto, "rb") as f:
                proto = f.read()
        self.proto = bytes(proto)
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=self.proto)
        self.vocabulary_size = int(self.processor.vocab_size())
        if spec is None:
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
            spec = TokenizerSpec("sentencepiece", self.vocabulary_size, START_ID, END_ID, PAD_ID)
        elif spec.kind != "sentencepiece" or spec.vocabulary_size != self.vocabulary_size:
            raise ValueError(
                f"The SentencePiece model has {self.vocabulary_size} pieces; the tokenizer "
                f"description says {spec.kind} with {spec.vocabulary_size}."
            )
        self.spec = spec
        self.start_id, self.end_id, self.pad_id = spec.start_id, spec.end_id, spec.pad_id
        self.token_dtype = np.uint16 if self.vocabulary_size <= 65536 else np.int32

    def encode(self, text: str) -> np.ndarray:
        """`text` as a 1-D array of piece ids (no start/end ids added).

        Lone surrogates raise `ValueError` (the Unicode rule, `check_text`).
        """
        ids = self.processor.encode(check_text(text))
        return np.asarray(ids, dtype=self.token_dtype)

    def decode(self, ids) -> str:
        """Text of `ids`, special ids removed."""
        special = set(self.spec.special_ids)
        return self.processor.decode(
            [int(i) for i in np.asarray(ids).reshape(-1) if int(i) not in special]
        )

    def describe(self) -> dict:
        """What must match when a run resumes (vocabulary size and a hash of the model)."""
        return {
            "kind": self.kind,
            "vocabulary_size": self.vocabulary_size,
            "sha256": hashlib.sha256(self.proto).hexdigest()[:16],
        }


def make_codec(spec: TokenizerSpec, proto: bytes | None = None):
    """The codec that `spec` (and, for SentencePiece, its proto) describes."""
    if spec.kind == "bytes":
        return ByteCodec(spec)
    if proto is None:
        raise ValueError("A SentencePiece tokenizer description needs its model proto.")
    return SentencePieceCodec(proto, spec)


def load_tokenizer(directory: str):
    """`(spec, codec)` from the `tokenizer.json` (+ proto) in `directory`."""
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {TOKENIZER_FILE} in {directory}: re-export the model.")
    with open(path) as f:
        spec = TokenizerSpec.from_json(json.load(f))
    proto = None
    if spec.kind == "sentencepiece":
        with open(os.path.join(directory, SENTENCEPIECE_FILE), "rb") as f:
            proto = f.read()
    return spec, make_codec(spec, proto)


def prompt_ids(spec: TokenizerSpec, codec, prompt: str) -> list[int]:
    """A prompt's ids as every runtime packs them: start id (when the model
    adds one) and the codec's ids, none of them special (`check_prompt_tokens`)."""
    ids = [int(i) for i in codec.encode(prompt)]
    check_prompt_tokens(prompt, ids, spec.special_ids, spec.kind)
    return [spec.start_id] + ids if spec.add_start_token else ids
