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
* **The tokenizer description** (`TokenizerSpec`) that travels with an export
  and the framework-free codecs built from it (`text_codec`).
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

import json
import math
import numbers
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


def check_prompts(prompts) -> list[str]:
    """A list of non-empty `str` prompts (bytes are decoded as UTF-8).

    >>> check_prompts("Hi")
    ['Hi']
    """
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(_received(PROMPTS_ERROR, prompts))
    out = []
    for prompt in prompts:
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8")
        if not isinstance(prompt, str):
            raise ValueError(_received(PROMPTS_ERROR, prompts))
        if not prompt:
            raise ValueError(EMPTY_PROMPT_ERROR)
        out.append(prompt)
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
        import os

        if (self.kind == "sentencepiece") != (proto is not None):
            raise ValueError("A SentencePiece spec needs its model proto; a byte spec has none.")
        with open(os.path.join(directory, TOKENIZER_FILE), "w") as f:
            json.dump(self.to_json(), f, indent=2)
        if proto is not None:
            with open(os.path.join(directory, SENTENCEPIECE_FILE), "wb") as f:
                f.write(proto)


class ByteCodec:
    """UTF-8 bytes as ids (invalid UTF-8 decodes to U+FFFD)."""

    def __init__(self, spec: TokenizerSpec):
        self.spec = spec

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        special = set(self.spec.special_ids)
        return bytes(int(i) for i in ids if int(i) not in special).decode("utf-8", "replace")


class SentencePieceCodec:
    """A SentencePiece proto through the `sentencepiece` library."""

    def __init__(self, spec: TokenizerSpec, proto: bytes):
        import sentencepiece

        self.spec = spec
        self.processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
        if self.processor.vocab_size() != spec.vocabulary_size:
            raise ValueError(
                f"The SentencePiece model has {self.processor.vocab_size()} pieces; the tokenizer "
                f"description says {spec.vocabulary_size}."
            )

    def encode(self, text: str) -> list[int]:
        return list(self.processor.encode(text))

    def decode(self, ids) -> str:
        special = set(self.spec.special_ids)
        return self.processor.decode([int(i) for i in ids if int(i) not in special])


def load_tokenizer(directory: str):
    """`(spec, codec)` from the `tokenizer.json` (+ proto) in `directory`."""
    import os

    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {TOKENIZER_FILE} in {directory}: re-export the model.")
    with open(path) as f:
        spec = TokenizerSpec.from_json(json.load(f))
    if spec.kind == "bytes":
        return spec, ByteCodec(spec)
    with open(os.path.join(directory, SENTENCEPIECE_FILE), "rb") as f:
        return spec, SentencePieceCodec(spec, f.read())


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
                    index=[chosen.get(a) for a in range(1, max(self.onnx_split) + 1)],
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
