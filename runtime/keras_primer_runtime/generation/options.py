"""Sampling options and length rules of the generation contract (NumPy only).

Temperature 0 is greedy (argmax, lowest id on ties); otherwise logits are
sorted by decreasing value, the largest is subtracted and the differences
(all <= 0) are divided by the temperature, so no finite float32 logits and
no temperature the contract accepts give inf - inf (at worst a difference
becomes -inf, probability 0). The top `top_k` (0 = all) and the smallest
prefix whose probability mass *before* a token is below `top_p` (1 = all)
are kept (the most likely token always is), and the next token is drawn from
the renormalized kept mass. `seed` makes a runtime repeat.

Every runtime computes in float32, and TensorFlow and JAX read a float32
below the smallest normal number (2**-126, about 1.1755e-38) as 0, and XLA
may divide by multiplying with the reciprocal. So `temperature` is 0 or in
[`MIN_TEMPERATURE`, `MAX_TEMPERATURE`] = [2**-126, 2**126] (the temperature
and its reciprocal are normal float32 numbers) and `top_p` in [`MIN_TOP_P`,
1] (`MIN_TOP_P` = 2**-126): anything outside is refused, in every runtime,
rather than read as 0 (or inf) by some and not others. At `MIN_TEMPERATURE`
sampling is the argmax (tied maxima evenly); a `top_p` no larger than the
top probability keeps only the most likely token (the lowest id of tied
maxima).

Length rule: prompt tokens (start token included) + `max_new_tokens`
<= max_sequence_length, computed in Python integers (never a wrapping int32).

>>> check_sampling(temperature=0.7, top_k=5).top_k
5
>>> check_sampling(temperature=1e-40)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: `temperature` must be a number: 0 (greedy) or from 2**-126 ... Received: 1e-40
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

#: float32's smallest normal number: TensorFlow and JAX flush smaller ones to 0.
FLOAT32_MIN_NORMAL = 2.0**-126
#: The smallest temperature that samples (0 is greedy; between is refused).
MIN_TEMPERATURE = FLOAT32_MIN_NORMAL
#: The largest temperature: its reciprocal, 2**-126, is still a normal float32
#: (XLA divides by multiplying with the reciprocal; a subnormal one is 0).
MAX_TEMPERATURE = 2.0**126
#: The smallest `top_p` (between 0 and it is refused).
MIN_TOP_P = FLOAT32_MIN_NORMAL

# === Error texts (the SavedModel graph asserts with the same strings) ===
TEMPERATURE_ERROR = (
    "`temperature` must be a number: 0 (greedy) or from 2**-126 to 2**126 (about 1.1755e-38 "
    "to 8.5071e37, where the temperature and its reciprocal are normal float32 numbers; "
    "TensorFlow and JAX read smaller ones as 0)."
)
TOP_K_ERROR = "`top_k` must be an integer >= 0 (0 = off)."
TOP_P_ERROR = (
    "`top_p` must be a number from 2**-126 (about 1.1755e-38, the smallest normal float32; "
    "TensorFlow and JAX read smaller ones as 0) to 1 (1 = off)."
)
SEED_ERROR = "`seed` must be an integer in [0, 2**31 - 1]."
MAX_NEW_TOKENS_ERROR = "`max_new_tokens` must be an integer >= 1."
LENGTH_ERROR = (
    "Prompt tokens (start token included) + `max_new_tokens` exceed the model's "
    "max_sequence_length={max_sequence_length}: shorten the prompt or lower `max_new_tokens`."
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
    # Compared as Python floats: the bounds are float32 numbers, so a value
    # that passes is a normal float32 (or 0) in every runtime.
    if not _is_real(temperature) or not (
        float(temperature) == 0.0 or MIN_TEMPERATURE <= float(temperature) <= MAX_TEMPERATURE
    ):
        raise ValueError(_received(TEMPERATURE_ERROR, temperature))
    if not _is_int(top_k) or top_k < 0 or top_k > INT32_MAX:
        raise ValueError(_received(TOP_K_ERROR, top_k))
    if not _is_real(top_p) or not MIN_TOP_P <= float(top_p) <= 1.0:
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
    order = np.argsort(-logits, axis=-1, kind="stable")
    sorted_logits = np.take_along_axis(logits, order, axis=-1)
    # The largest logit is subtracted before dividing: differences <= 0 over
    # a temperature >= 2**-126 reach -inf at worst, never inf - inf.
    with np.errstate(over="ignore", under="ignore"):
        scaled = (sorted_logits - sorted_logits[:, :1]) / np.float32(options.temperature)
        probs = np.exp(scaled)
    probs = probs / probs.sum(-1, keepdims=True)
    rank = np.arange(vocab)[None, :]
    keep = rank < (options.top_k or vocab)
    if options.top_p < 1.0:
        # Compared in float32, as the Keras and SavedModel runtimes compare.
        keep = keep & ((np.cumsum(probs, -1) - probs) < np.float32(options.top_p))
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
