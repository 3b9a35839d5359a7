"""The decoding contract shared by every runtime (stdlib + NumPy only).

One place says what generation means for keras-primer; Keras `generate`, the
SavedModel signatures (`keras_primer.generation`, TensorFlow) and the ONNX
Runtime generator (`keras_primer_runtime.ort_generator`) derive from it:

* **Sampling options** (`SamplingOptions`, `check_sampling`): temperature 0 is
  greedy (argmax, lowest id on ties); otherwise logits are divided by the
  temperature, sorted by decreasing value, the top `top_k` (0 = all) and the
  smallest prefix whose probability mass *before* a token is below `top_p`
  (1 = all) are kept (the most likely token always is), and the next token
  is drawn from the renormalized kept mass. `seed` makes a runtime repeat.
* **Length rules** (`check_max_new_tokens`): at least one new token; prompt
  tokens (start token included) + `max_new_tokens` <= max_sequence_length,
  computed in Python integers (never a wrapping int32).
* **Prompts** (`check_prompts`): a non-empty list of non-empty strings.
* **The Unicode rule** (`check_text`, `UNICODE_ERROR`): a prompt must be valid
  Unicode text: `bytes` must be valid UTF-8, a `str` must hold no lone
  surrogate (U+D800 to U+DFFF). Anything else is refused with `ValueError`
  (the SavedModel: `InvalidArgumentError`) carrying `UNICODE_ERROR`, in every
  runtime and for both tokenizers; nothing is replaced or dropped silently.
  Generated ids that do not form valid UTF-8 (a byte model may emit any
  byte) are shown as U+FFFD.
* **The tokenizer description** (`TokenizerSpec`) that travels with an export
  and the one codec per kind built from it (`ByteCodec`,
  `SentencePieceCodec`, `make_codec`), which corpus encoding uses as well.
* **The decoding loop** (`loop_bounds`, `decode_position`, `shown_tokens`):
  prompt packing, forced prompt tokens, the stop at the end id and the
  post-processing, written once against an array namespace (NumPy in ONNX
  Runtime, `tf.experimental.numpy` in the SavedModel).
* **The decoding-state description** (`StateSpec`), as a model reports it.

Every check raises `ValueError` with the texts built here, so a bad option
reads the same whatever runtime received it.

>>> check_sampling(temperature=0.7, top_k=5).top_k
5
>>> check_sampling(top_p=1.5)
Traceback (most recent call last):
...
ValueError: `top_p` must be a number in (0, 1] (1 = off). Received: 1.5
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field

import numpy as np

# === Error texts (the SavedModel graph asserts with the same strings) ===
TEMPERATURE_ERROR = "`temperature` must be a finite number >= 0 (0 = greedy)."
TOP_K_ERROR = "`top_k` must be an integer >= 0 (0 = off)."
TOP_P_ERROR = "`top_p` must be a number in (0, 1] (1 = off)."
SEED_ERROR = "`seed` must be an integer in [0, 2**31 - 1]."
MAX_NEW_TOKENS_ERROR = "`max_new_tokens` must be an integer >= 1."
LENGTH_ERROR = (
    "Prompt tokens (start token included) + `max_new_tokens` exceed the model's "
    "max_sequence_length={max_sequence_length}: shorten the prompt or lower `max_new_tokens`."
)
PROMPTS_ERROR = "`prompts` must be a non-empty string or a non-empty list of strings."
EMPTY_PROMPT_ERROR = "Every prompt must be a non-empty string (a prompt is empty)."
UNICODE_ERROR = (
    "Every prompt must be valid Unicode text: UTF-8 bytes, or a str without lone "
    "surrogates (U+D800 to U+DFFF); nothing is replaced silently."
)
INT32_MAX = 2**31 - 1


def _received(text: str, value) -> str:
    return f"{text} Received: {value!r}"


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class SamplingOptions:
    """Checked sampling options (build them with `check_sampling`)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax."""
        return self.temperature == 0.0


def check_sampling(temperature=0.0, top_k=0, top_p=1.0, seed=0) -> SamplingOptions:
    """Checks and returns sampling options; `ValueError` with the shared text.

    >>> check_sampling(temperature=0.0).greedy
    True
    """
    if not _is_real(temperature) or not math.isfinite(float(temperature)) or temperature < 0:
        raise ValueError(_received(TEMPERATURE_ERROR, temperature))
    if not _is_int(top_k) or top_k < 0 or top_k > INT32_MAX:
        raise ValueError(_received(TOP_K_ERROR, top_k))
    if not _is_real(top_p) or not math.isfinite(float(top_p)) or not 0 < top_p <= 1:
        raise ValueError(_received(TOP_P_ERROR, top_p))
    if seed is None:
        seed = 0
    if not _is_int(seed) or not 0 <= seed <= INT32_MAX:
        raise ValueError(_received(SEED_ERROR, seed))
    return SamplingOptions(float(temperature), int(top_k), float(top_p), int(seed))


def check_max_new_tokens(max_new_tokens, longest_prompt=None, max_sequence_length=None) -> int:
    """Checks `max_new_tokens` (and, when given, the length rule).

    >>> check_max_new_tokens(4, longest_prompt=3, max_sequence_length=8)
    4
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(_received(MAX_NEW_TOKENS_ERROR, max_new_tokens))
    if max_sequence_length is not None and longest_prompt is not None:
        # Python integers: no int32 wrap-around for values near 2**31.
        if int(longest_prompt) + int(max_new_tokens) > int(max_sequence_length):
            raise ValueError(
                _received(
                    LENGTH_ERROR.format(max_sequence_length=max_sequence_length), max_new_tokens
                )
            )
    return int(max_new_tokens)


def check_text(text, index: int | None = None) -> str:
    r"""`text` as a `str` under the Unicode rule: `bytes` must be valid UTF-8,
    a `str` must hold no lone surrogate; else `ValueError(UNICODE_ERROR ...)`.

    >>> check_text(b"caf\xc3\xa9")
    'café'
    >>> check_text(b"\xff\xfeA")
    Traceback (most recent call last):
    ...
    ValueError: Every prompt must be valid Unicode text: UTF-8 bytes, or a str without lone surrogates (U+D800 to U+DFFF); nothing is replaced silently. Received: b'\xff\xfeA' (invalid UTF-8 at byte 0)
    """
    where = "" if index is None else f"prompt {index}: "
    try:
        if isinstance(text, bytes):
            return text.decode("utf-8")
        if isinstance(text, str):
            text.encode("utf-8")  # only lone surrogates fail
    except UnicodeDecodeError as e:
        detail = f"{where}{text!r} (invalid UTF-8 at byte {e.start})"
        raise ValueError(f"{UNICODE_ERROR} Received: {detail}") from None
    except UnicodeEncodeError as e:
        detail = f"{where}{text!r} (lone surrogate at character {e.start})"
        raise ValueError(f"{UNICODE_ERROR} Received: {detail}") from None
    return text


def check_prompts(prompts) -> list[str]:
    """A list of non-empty `str` prompts under the Unicode rule (`check_text`;
    bytes are decoded as UTF-8).

    >>> check_prompts("Hi")
    ['Hi']
    """
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(_received(PROMPTS_ERROR, prompts))
    out = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, bytes)):
            raise ValueError(_received(PROMPTS_ERROR, prompts))
        if not prompt:
            raise ValueError(EMPTY_PROMPT_ERROR)
        out.append(check_text(prompt, index if len(prompts) > 1 else None))
    return out


def filtered_probabilities(logits, options: SamplingOptions) -> np.ndarray:
    """The next-token distribution `[batch, vocab]` that `options` sample from.

    Greedy options give a one-hot of the argmax. This is the NumPy port of
    `keras_primer.generation.filtered_probabilities`; parity tests pin the two.

    >>> p = filtered_probabilities(np.array([[2.0, 1.0, 0.0]]), check_sampling(1.0, top_k=2))
    >>> [round(float(x), 4) for x in p[0]]
    [0.7311, 0.2689, 0.0]
    """
    logits = np.asarray(logits, np.float32)
    vocab = logits.shape[-1]
    if options.greedy:
        return np.eye(vocab, dtype=np.float32)[logits.argmax(-1)]
    scaled = logits / np.float32(options.temperature)
    order = np.argsort(-scaled, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(scaled, order, axis=-1)
    probs = np.exp(sorted_logits - sorted_logits[:, :1])
    probs = probs / probs.sum(-1, keepdims=True)
    rank = np.arange(vocab)[None, :]
    keep = rank < (options.top_k or vocab)
    if options.top_p < 1.0:
        keep = keep & ((np.cumsum(probs, -1) - probs) < options.top_p)
    keep = keep | (rank == 0)
    kept = np.where(keep, probs, 0.0)
    kept = kept / kept.sum(-1, keepdims=True)
    out = np.zeros_like(kept)
    np.put_along_axis(out, order, kept, axis=-1)
    return out.astype(np.float32)


def choose_next(logits, options: SamplingOptions, rng: np.random.Generator) -> np.ndarray:
    """Next token ids `[batch]` (int64) for `[batch, vocab]` logits."""
    logits = np.asarray(logits, np.float32)
    if options.greedy:
        return logits.argmax(-1)
    probs = filtered_probabilities(logits, options).astype(np.float64)
    probs /= probs.sum(-1, keepdims=True)
    return np.array([rng.choice(probs.shape[-1], p=row) for row in probs])


# === Tokenizer description ===
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

    def save(self, directory: str, proto: bytes | None = None) -> None:
        """Writes `tokenizer.json` (and `tokenizer.model` for SentencePiece)."""
        if (self.kind == "sentencepiece") != (proto is not None):
            raise ValueError("A SentencePiece spec needs its model proto; a byte spec has none.")
        with open(os.path.join(directory, TOKENIZER_FILE), "w") as f:
            json.dump(self.to_json(), f, indent=2)
        if proto is not None:
            with open(os.path.join(directory, SENTENCEPIECE_FILE), "wb") as f:
                f.write(proto)


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
    adds one) and the codec's ids."""
    ids = [int(i) for i in codec.encode(prompt)]
    return [spec.start_id] + ids if spec.add_start_token else ids


# === The decoding loop ===
# One description of the loop, written against an array namespace `xp`:
# NumPy in the ONNX Runtime generator, `tf.experimental.numpy` inside the
# SavedModel's `tf.while_loop`. Each prompt row is right-padded with the pad
# id to `max(lengths) + max_new_tokens`; the model runs the shortest prompt
# in one step, then one position at a time; at a position still inside a
# row's prompt the prompt's own token is kept (forced), after it the sampled
# one; a row is done at its first generated end id or at its limit
# (`length + max_new_tokens`); the loop stops when every row is done.


def loop_bounds(xp, lengths, max_new_tokens):
    """`(limits, total, start)`: each row's last position + 1, the padded
    width and the first position the loop decodes."""
    limits = lengths + max_new_tokens
    return limits, xp.max(lengths) + max_new_tokens, xp.min(lengths)


def decode_position(xp, position, chosen, tokens, positions, lengths, limits, done, end_id):
    """Writes position `position` of every row; returns `(token, tokens, done)`.

    `chosen` are the sampled ids `[batch]`, `positions` is `arange(total)[None]`.
    """
    in_prompt = position < lengths
    token = xp.where(in_prompt, xp.take(tokens, position, axis=1), chosen)
    tokens = xp.where(positions == position, token[:, None], tokens)
    ended = xp.logical_and(xp.logical_not(in_prompt), token == end_id)
    done = xp.logical_or(xp.logical_or(done, ended), position + 1 >= limits)
    return token, tokens, done


def shown_tokens(xp, tokens, positions, lengths, limits, spec: TokenizerSpec):
    """Post-processing: `(visible, shown, generated)` masks `[batch, total]`.

    `visible`: each row's prompt and new tokens up to (and with) its first
    generated end id, a prefix of the row (the token ids a runtime returns);
    `shown`: `visible` without special ids (the text's ids); `generated`:
    positions after the prompt (`shown & generated` is the completion).
    """
    valid = positions < limits[:, None]
    generated = positions >= lengths[:, None]
    ends = xp.where(xp.logical_and(xp.logical_and(generated, valid), tokens == spec.end_id), 1, 0)
    after_end = (xp.cumsum(ends, axis=1) - ends) > 0
    visible = xp.logical_and(valid, xp.logical_not(after_end))
    shown = visible
    for special in spec.special_ids:
        shown = xp.logical_and(shown, tokens != special)
    return visible, shown, generated


# === Decoding-state description ===
#: The decoder-with-past naming convention of the ONNX step model, declared once:
#: an attention cache tensor `N.key` goes in as `past_key_values.N.key` and comes
#: out as `present.N.key` (Hugging Face Optimum's names); any other state `S`
#: goes in as `S` and comes out as `present_S`.
ONNX_PAST_KEY_VALUES = "past_key_values."


def onnx_present_name(past: str) -> str:
    """The step model's output name for the state fed in as `past`.

    >>> onnx_present_name("past_key_values.0.key"), onnx_present_name("conv_state.1")
    ('present.0.key', 'present_conv_state.1')
    """
    if past.startswith(ONNX_PAST_KEY_VALUES):
        return "present." + past[len(ONNX_PAST_KEY_VALUES) :]
    return "present_" + past


@dataclass(frozen=True)
class StateSpec:
    """One decoding-state tensor as the model describes it.

    `shape` holds ints and the symbols `"batch"` and `"max_length"` (the
    dynamic axes); the runtime fills them in. The ONNX step model feeds the
    state as one tensor per index of the `onnx_split` axes, each named by
    `onnx_name.format(*labels)`, a label being the index or, where the axis
    has them, its `onnx_labels` entry (see `onnx_tensors`).

    >>> StateSpec("key", ("batch", "max_length", 2, 8), "float32").concrete(1, 5)
    (1, 5, 2, 8)
    """

    name: str
    shape: tuple
    dtype: str = "float32"
    onnx_name: str = ""
    onnx_split: tuple = ()
    onnx_labels: tuple = ()

    def concrete(self, batch_size: int, max_length: int) -> tuple:
        """The shape for `batch_size` rows of up to `max_length` tokens."""
        sizes = {"batch": batch_size, "max_length": max_length}
        return tuple(sizes.get(d, d) for d in self.shape)

    def onnx_tensors(self) -> list[dict]:
        """The ONNX tensors of this state, in graph order.

        Each: `state` (this name), `index` (per axis after the batch axis up
        to the last split one: the index taken, None for a kept axis),
        `shape` (the split axes dropped), `past`/`present` (ONNX names) and
        `dtype`.

        >>> spec = StateSpec("kv", ("batch", 2, 2, "max_length", 4), onnx_name="past_key_values.{}.{}",
        ...                  onnx_split=(1, 2), onnx_labels=((), ("key", "value")))
        >>> [(t["past"], t["present"], t["index"], t["shape"]) for t in spec.onnx_tensors()][1]
        ('past_key_values.0.value', 'present.0.value', [0, 1], ['batch', 'max_length', 4])
        """
        import itertools

        if not self.onnx_name:
            raise ValueError(f"Decoding state {self.name!r} has no ONNX name.")
        labels = dict(itertools.zip_longest(self.onnx_split, self.onnx_labels, fillvalue=()))
        shape = [d for axis, d in enumerate(self.shape) if axis not in self.onnx_split]
        out = []
        for indices in itertools.product(*(range(self.shape[a]) for a in self.onnx_split)):
            chosen = dict(zip(self.onnx_split, indices))
            past = self.onnx_name.format(
                *(labels[a][i] if labels[a] else i for a, i in chosen.items())
            )
            out.append(
                dict(
                    state=self.name,
                    index=[chosen.get(a) for a in range(1, max(self.onnx_split, default=0) + 1)],
                    shape=shape,
                    past=past,
                    present=onnx_present_name(past),
                    dtype=self.dtype,
                )
            )
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict) -> StateSpec:
        return cls(data["name"], tuple(data["shape"]), data.get("dtype", "float32"))
