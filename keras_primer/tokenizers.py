"""The keras-hub tokenizers of keras-primer, all in this one module.

* `PrimerTokenizer`: UTF-8 bytes as ids (vocabulary 256).
* `FeedbackTokenizer`: the same tokenizer, bound to `FeedbackBackbone` (so
  keras-hub presets of that backbone find their tokenizer class).
* `PrimerSentencePieceTokenizer`: a SentencePiece model trained by
  `keras_primer.data.train_sentencepiece`.

Each describes itself as the decoding contract's `TokenizerSpec`
(`tokenizer.tokenizer_spec()`) and gives the matching framework-free codec of
`keras_primer_runtime.generation` (`tokenizer.codec()`), the one codec per kind
that corpus encoding, the ONNX Runtime generator and the tests use. The
exporters accept exactly the tokenizers that can describe themselves
(`tokenizer_spec(model)`). All share the special ids pad 0, start 2, end 3.

The registered names (`keras_primer>PrimerTokenizer`, ...) are what `.keras`
files name, so a file written by any version of the package loads.

>>> tokenizer = PrimerTokenizer()
>>> tokenizer.tokenizer_spec().special_ids
[0, 2, 3]
>>> tokenizer.codec().encode("Hi!").tolist()
[72, 105, 33]
"""

from __future__ import annotations

import keras
from keras_hub.tokenizers import ByteTokenizer, SentencePieceTokenizer

from keras_primer_cli.logging_setup import quiet_native_logs
from keras_primer_runtime.generation import (
    END_ID,
    PAD_ID,
    START_ID,
    ByteCodec,
    SentencePieceCodec,
    TokenizerSpec,
)

START_TOKEN = chr(START_ID)  # ASCII STX
END_TOKEN = chr(END_ID)  # ASCII ETX
PAD_TOKEN = chr(PAD_ID)  # ASCII NUL

KNOWN_TOKENIZERS = (
    "PrimerTokenizer (bytes), FeedbackTokenizer (bytes), PrimerSentencePieceTokenizer"
)


class _BackboneNamed:
    """keras-hub's `backbone_cls`, found by its registered name.

    The family packages import this module (their preprocessors name their
    tokenizer), so importing their backbones here would make a cycle.
    keras-hub reads `backbone_cls` only when it loads a preset, after the
    backbone class is registered.
    """

    def __init__(self, registered_name: str):
        self.registered_name = registered_name

    def __get__(self, instance, owner):
        return keras.saving.get_registered_object(self.registered_name)


class _DescribedTokenizer:
    """Mixin: a tokenizer that describes itself to the decoding contract.

    A subclass that changes how text becomes ids (overrides `tokenize` or
    `detokenize`) must also override `tokenizer_spec`: the exported runtimes
    would otherwise tokenize differently from Keras.
    """

    def _check_described(self):
        # The class whose `tokenizer_spec` applies describes its own methods.
        owner = next(c for c in type(self).__mro__ if "tokenizer_spec" in vars(c))
        for name in ("tokenize", "detokenize"):
            if getattr(type(self), name) is not getattr(owner, name):
                raise ValueError(
                    f"Cannot describe a {type(self).__name__} to the exporters: it overrides "
                    f"`{name}`, so their runtimes would tokenize differently. Override "
                    "`tokenizer_spec` too, or use one of: " + KNOWN_TOKENIZERS + "."
                )

    def _special_ids(self) -> dict:
        ids = {int(self.start_token_id), int(self.end_token_id), int(self.pad_token_id)}
        return dict(
            start_id=int(self.start_token_id),
            end_id=int(self.end_token_id),
            pad_id=int(self.pad_token_id),
            # Keras strips the tokenizer's special ids from generated text.
            extra_special_ids=tuple(sorted(set(map(int, self.special_token_ids)) - ids)),
        )


@keras.saving.register_keras_serializable(package="keras_primer")
class PrimerTokenizer(_DescribedTokenizer, ByteTokenizer):
    """UTF-8 bytes as token ids (vocabulary 256), case preserved.

    Id 0 pads, the control bytes STX (2) and ETX (3) start and end a sequence.
    Text that itself contains those bytes is tokenized to the same ids. No
    vocabulary file is needed, so `save_assets` writes nothing and
    `load_preset_assets` reads nothing. TensorFlow is used inside `tf.data`
    pipelines; elsewhere tokenization runs in Python.

    Example:

    >>> tokenizer = PrimerTokenizer()
    >>> [int(i) for i in tokenizer("Hi!")]
    [72, 105, 33]
    >>> tokenizer.detokenize([72, 105, 33])
    'Hi!'
    """

    backbone_cls = _BackboneNamed("keras_primer>PrimerBackbone")

    def __init__(self, lowercase: bool = False, **kwargs):
        self._add_special_token(START_TOKEN, "start_token")
        self._add_special_token(END_TOKEN, "end_token")
        self._add_special_token(PAD_TOKEN, "pad_token")
        super().__init__(lowercase=lowercase, **kwargs)

    def save_assets(self, dir_path: str) -> None:
        """Byte-level: there is no vocabulary file to save."""

    def load_preset_assets(self, preset) -> None:
        """Byte-level: there is no vocabulary file to load."""

    def tokenizer_spec(self, add_start_token: bool = True) -> TokenizerSpec:
        """This tokenizer as the decoding contract describes it.

        Raises `ValueError` for options the exported runtimes do not run
        (`lowercase`, a `normalization_form`).

        >>> PrimerTokenizer().tokenizer_spec(add_start_token=False).add_start_token
        False
        """
        self._check_described()
        if self.lowercase or self.normalization_form is not None:
            raise ValueError(
                "Cannot export a byte tokenizer with lowercase=True or a normalization_form: "
                "the exported runtimes tokenize raw UTF-8 bytes only."
            )
        return TokenizerSpec(
            "bytes",
            int(self.vocabulary_size()),
            add_start_token=bool(add_start_token),
            **self._special_ids(),
        )

    def codec(self, add_start_token: bool = True) -> ByteCodec:
        """The framework-free codec with this tokenizer's ids."""
        return ByteCodec(self.tokenizer_spec(add_start_token))


@keras.saving.register_keras_serializable(package="keras_primer")
class FeedbackTokenizer(PrimerTokenizer):
    """`PrimerTokenizer` (UTF-8 bytes, vocabulary 256) bound to `FeedbackBackbone`.

    Identical behaviour; the subclass only lets keras-hub presets of a
    `FeedbackBackbone` find their tokenizer class.

    Example:

    >>> tokenizer = FeedbackTokenizer()
    >>> [int(i) for i in tokenizer("Hi!")]
    [72, 105, 33]
    """

    backbone_cls = _BackboneNamed("keras_primer>FeedbackBackbone")


@keras.saving.register_keras_serializable(package="keras_primer")
class PrimerSentencePieceTokenizer(_DescribedTokenizer, SentencePieceTokenizer):
    """A keras-hub `SentencePieceTokenizer` with start/end/pad tokens.

    Works with a model trained by `keras_primer.data.train_sentencepiece`
    (pieces `<pad>` = 0, `<unk>` = 1, `<s>` = 2, `</s>` = 3), so the causal LM
    preprocessors can use it in place of the byte tokenizer. The proto is
    saved with the model (`.keras` assets); `import keras_primer` registers
    the class, so such files load.
    """

    def __init__(self, proto=None, **kwargs):
        self._add_special_token("<s>", "start_token")
        self._add_special_token("</s>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        super().__init__(proto=proto, **kwargs)

    def set_proto(self, proto):
        # tensorflow-text's SentencePiece logs an INFO line on fd 2 for every
        # model it loads; the commands keep it out of their output.
        with quiet_native_logs():
            super().set_proto(proto)

    def tokenizer_spec(self, add_start_token: bool = True) -> TokenizerSpec:
        """This tokenizer as the decoding contract describes it (its proto is
        `self.proto`)."""
        self._check_described()
        if self.proto is None:
            raise ValueError("Cannot export: the SentencePiece tokenizer has no model proto set.")
        return TokenizerSpec(
            "sentencepiece",
            int(self.vocabulary_size()),
            add_start_token=bool(add_start_token),
            **self._special_ids(),
        )

    def codec(self, add_start_token: bool = True) -> SentencePieceCodec:
        """The framework-free codec of this model proto (needs `sentencepiece`)."""
        return SentencePieceCodec(bytes(self.proto), self.tokenizer_spec(add_start_token))


def keras_tokenizer(
    codec, byte_tokenizer_cls: type = None
) -> PrimerTokenizer | PrimerSentencePieceTokenizer:
    """The keras-hub tokenizer of a codec (for a model's preprocessor): the
    family's byte tokenizer (`byte_tokenizer_cls`, default `PrimerTokenizer`)
    or a `PrimerSentencePieceTokenizer` of the codec's proto.

    >>> type(keras_tokenizer(ByteCodec())).__name__
    'PrimerTokenizer'
    """
    if codec.kind == "bytes":
        cls = byte_tokenizer_cls if byte_tokenizer_cls is not None else PrimerTokenizer
        if not issubclass(cls, PrimerTokenizer):  # e.g. a SentencePiece tokenizer class
            cls = PrimerTokenizer
        return cls()
    if codec.kind == "sentencepiece":
        return PrimerSentencePieceTokenizer(proto=codec.proto)
    raise ValueError(f"Unknown codec kind {codec.kind!r}; expected 'bytes' or 'sentencepiece'.")


def tokenizer_spec(model) -> tuple[TokenizerSpec, bytes | None]:
    """`(TokenizerSpec, proto_or_None)` of a causal LM's tokenizer.

    Raises `ValueError` for a model without a tokenizer, or with a tokenizer
    that cannot describe itself to the exporters.
    """
    preprocessor = getattr(model, "preprocessor", None)
    tokenizer = getattr(preprocessor, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(
            f"Cannot export {type(model).__name__}: it has no preprocessor/tokenizer, so the "
            f"exported text signatures would have to guess one. Attach one of: "
            f"{KNOWN_TOKENIZERS}."
        )
    if not isinstance(tokenizer, _DescribedTokenizer):
        raise ValueError(
            f"Cannot export a model whose tokenizer is a {type(tokenizer).__name__}: the "
            f"exporters only know {KNOWN_TOKENIZERS}."
        )
    spec = tokenizer.tokenizer_spec(bool(getattr(preprocessor, "add_start_token", True)))
    proto = None if spec.kind == "bytes" else bytes(tokenizer.proto)
    return spec, proto
