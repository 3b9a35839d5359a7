"""The Keras / TensorFlow side of the decoding contract.

`keras_primer_runtime.decoding` states the contract (sampling semantics,
checks and error texts, the tokenizer description, the state description);
this package applies it with `keras.ops`, on every backend:

* `filtered_probabilities(logits, temperature, top_k, top_p)`: the
  next-token distribution, used by Keras `generate` (`ContractSampler`) and
  by the SavedModel decoding loop (`keras_primer.export.saved_model`).
* `ContractSampler`: a keras-hub sampler with the contract's semantics.
* `check_sampler(sampler)`: validates any keras-hub sampler with the
  contract's checks (same error texts as the SavedModel and ONNX Runtime).
* `tokenizer_spec(model)`: the `TokenizerSpec` (+ SentencePiece proto) of a
  causal LM; refuses tokenizers the exporters do not know.

>>> import numpy as np
>>> p = filtered_probabilities(np.array([[2.0, 1.0, 0.0]], "float32"), 1.0, 2, 1.0)
>>> [round(float(x), 4) for x in keras.ops.convert_to_numpy(p)[0]]
[0.7311, 0.2689, 0.0]
"""

import keras
from keras import ops
from keras_hub.samplers import GreedySampler, Sampler, TopKSampler, TopPSampler

from keras_primer_runtime.decoding import (
    SamplingOptions,
    TokenizerSpec,
    check_sampling,
)

__all__ = [
    "ContractSampler",
    "check_sampler",
    "filtered_probabilities",
    "tokenizer_spec",
]


def filtered_probabilities(logits, temperature, top_k, top_p):
    """Next-token probabilities `[batch, vocab]` for sampling (`temperature > 0`).

    Logits are divided by `temperature`, sorted by decreasing value; ranks
    below `top_k` (0 = all) whose preceding probability mass is below `top_p`
    (1 = all) are kept, the first rank always; the kept mass is renormalized
    and returned in vocabulary order. `keras_primer_runtime.decoding.
    filtered_probabilities` is the NumPy port of this function.
    """
    logits = ops.cast(logits, "float32")
    vocab = ops.shape(logits)[-1]
    scaled = logits / ops.cast(temperature, "float32")
    sorted_logits, sorted_ids = ops.top_k(scaled, k=vocab, sorted=True)
    probs = ops.softmax(sorted_logits, axis=-1)
    rank = ops.expand_dims(ops.arange(vocab, dtype="int32"), 0)
    top_k = ops.cast(top_k, "int32")
    keep = rank < ops.where(top_k > 0, top_k, vocab)
    top_p = ops.cast(top_p, "float32")
    mass_before = ops.cumsum(probs, axis=-1) - probs
    keep = ops.logical_and(keep, ops.logical_or(mass_before < top_p, top_p >= 1.0))
    keep = ops.logical_or(keep, rank == 0)
    kept = ops.where(keep, probs, ops.zeros_like(probs))
    kept = kept / ops.sum(kept, axis=-1, keepdims=True)
    # Back to vocabulary order: position of each id in the sorted order.
    inverse = ops.argsort(sorted_ids, axis=-1)
    return ops.take_along_axis(kept, inverse, axis=-1)


@keras.saving.register_keras_serializable(package="keras_primer")
class ContractSampler(Sampler):
    """Greedy or temperature / top-k / top-p sampling, as every runtime does it.

    Args:
        temperature: 0 for greedy, else the logit divisor.
        top_k: Keep the `top_k` most likely tokens (0 = off).
        top_p: Keep the smallest set whose mass reaches `top_p` (1 = off).
        seed: Seed of the random draws.

    Example:

    >>> ContractSampler(temperature=0.0).get_config()["top_p"]
    1.0
    """

    def __init__(self, temperature=0.0, top_k=0, top_p=1.0, seed=0, **kwargs):
        options = check_sampling(temperature, top_k, top_p, seed)
        # keras-hub divides logits by `temperature` in `compute_probabilities`,
        # which is overridden here; keep its attribute at 1.
        super().__init__(temperature=1.0, **kwargs)
        self.options = options
        self.seed_generator = keras.random.SeedGenerator(options.seed)

    def compute_probabilities(self, logits):
        o = self.options
        if o.greedy:
            return ops.cast(logits, "float32")  # argmax below
        return filtered_probabilities(logits, o.temperature, o.top_k, o.top_p)

    def get_next_token(self, probabilities):
        if self.options.greedy:
            return ops.argmax(probabilities, axis=-1)
        return ops.squeeze(
            keras.random.categorical(
                ops.log(probabilities), 1, seed=self.seed_generator, dtype="int32"
            ),
            axis=-1,
        )

    def get_config(self):
        o = self.options
        return {"temperature": o.temperature, "top_k": o.top_k, "top_p": o.top_p, "seed": o.seed}


def check_sampler(sampler) -> SamplingOptions:
    """Checks a keras-hub sampler's options with the contract's rules.

    Returns the equivalent `SamplingOptions` where there is one (greedy,
    top-k, top-p, `ContractSampler`), else only checks the temperature.

    >>> check_sampler(TopPSampler(p=0.9)).top_p
    0.9
    """
    if isinstance(sampler, ContractSampler):
        return sampler.options
    temperature = getattr(sampler, "temperature", 1.0)
    if isinstance(sampler, GreedySampler):
        return check_sampling(0.0)
    seed = getattr(sampler, "seed", None)
    seed = seed if isinstance(seed, int) else 0
    if isinstance(sampler, TopPSampler):
        return check_sampling(temperature, sampler.k or 0, sampler.p, seed)
    if isinstance(sampler, TopKSampler):
        return check_sampling(temperature, sampler.k, 1.0, seed)
    return check_sampling(temperature, 0, 1.0, seed)


def tokenizer_spec(model):
    """`(TokenizerSpec, proto_or_None)` of a causal LM's tokenizer.

    Raises `ValueError` for a model without a tokenizer, or with a tokenizer
    the exporters do not know how to run outside Keras.
    """
    from keras_primer.data.tokenizers import PrimerSentencePieceTokenizer
    from keras_primer.models.primer.primer_tokenizer import PrimerTokenizer

    preprocessor = getattr(model, "preprocessor", None)
    tokenizer = getattr(preprocessor, "tokenizer", None)
    known = "PrimerTokenizer (bytes), FeedbackTokenizer (bytes), PrimerSentencePieceTokenizer"
    if tokenizer is None:
        raise ValueError(
            f"Cannot export {type(model).__name__}: it has no preprocessor/tokenizer, so the "
            f"exported text signatures would have to guess one. Attach one of: {known}."
        )
    if type(tokenizer).__name__ not in (
        "PrimerTokenizer",
        "FeedbackTokenizer",
        "PrimerSentencePieceTokenizer",
    ) or not isinstance(tokenizer, (PrimerTokenizer, PrimerSentencePieceTokenizer)):
        raise ValueError(
            f"Cannot export a model whose tokenizer is a {type(tokenizer).__name__}: the "
            f"exporters only know {known}."
        )
    ids = {int(tokenizer.start_token_id), int(tokenizer.end_token_id), int(tokenizer.pad_token_id)}
    common = dict(
        start_id=int(tokenizer.start_token_id),
        end_id=int(tokenizer.end_token_id),
        pad_id=int(tokenizer.pad_token_id),
        add_start_token=bool(getattr(preprocessor, "add_start_token", True)),
        # Keras strips the tokenizer's special ids from generated text.
        extra_special_ids=tuple(sorted(set(map(int, tokenizer.special_token_ids)) - ids)),
    )
    if isinstance(tokenizer, PrimerTokenizer):
        if tokenizer.lowercase or tokenizer.normalization_form is not None:
            raise ValueError(
                "Cannot export a byte tokenizer with lowercase=True or a normalization_form: "
                "the exported runtimes tokenize raw UTF-8 bytes only."
            )
        return TokenizerSpec("bytes", int(tokenizer.vocabulary_size()), **common), None
    proto = tokenizer.proto
    if proto is None:
        raise ValueError("Cannot export: the SentencePiece tokenizer has no model proto set.")
    return TokenizerSpec("sentencepiece", int(tokenizer.vocabulary_size()), **common), bytes(proto)
