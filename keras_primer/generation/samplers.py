"""The samplers: the generation contract's sampling with `keras.ops`.

`keras_primer_runtime.generation` states the contract (sampling semantics,
checks and error texts, the tokenizer description, the state description);
this module applies it with `keras.ops`, on every backend:

* `filtered_probabilities(logits, temperature, top_k, top_p)`: the
  next-token distribution, used by Keras `generate` (`ContractSampler`) and
  by the SavedModel decoding loop (`keras_primer.export.saved_model`).
* `ContractSampler`: a keras-hub sampler with the contract's semantics.
* `check_sampler(sampler)`: validates any keras-hub sampler with the
  contract's checks (same error texts as the SavedModel and ONNX Runtime),
  plus what a keras-hub sampler cannot do (`TopKSampler(k=0)` keeps no
  token, `temperature=0` divides by zero); the causal LMs call it in
  `generate`, before the first token.
* `get_sampler(sampler)`: `compile`'s sampler argument as a sampler; `None`
  (the default of `compile`) is `ContractSampler()`, greedy.

>>> import numpy as np
>>> p = filtered_probabilities(np.array([[2.0, 1.0, 0.0]], "float32"), 1.0, 2, 1.0)
>>> [round(float(x), 4) for x in keras.ops.convert_to_numpy(p)[0]]
[0.7311, 0.2689, 0.0]
"""

import keras
import keras_hub
from keras import ops
from keras_hub.samplers import GreedySampler, Sampler, TopKSampler, TopPSampler

from keras_primer_runtime.generation import SamplingOptions, check_sampling

__all__ = [
    "ContractSampler",
    "check_sampler",
    "filtered_probabilities",
    "get_sampler",
]

KERAS_HUB_TEMPERATURE_ERROR = (
    "`temperature` of a keras-hub {name} must be > 0: it divides the logits. For the "
    "contract's temperature 0 (greedy) compile with sampler=ContractSampler(temperature=0) "
    "or sampler='greedy'."
)
KERAS_HUB_K_ERROR = (
    "`k` of a keras-hub {name} must be an integer >= 1 (it keeps the k most likely tokens). "
    "For the contract's top_k=0 (no limit) compile with sampler=ContractSampler(top_k=0, ...)."
)


def filtered_probabilities(logits, temperature, top_k, top_p):
    """Next-token probabilities `[batch, vocab]` for sampling (`temperature > 0`).

    Logits are sorted by decreasing value, the largest is subtracted and the
    differences are divided by `temperature` (in [2**-126, 2**126], as the
    contract's `check_sampling` guarantees: no finite logits give inf - inf);
    ranks below `top_k` (0 = all) whose preceding probability mass is below
    `top_p` (1 = all) are kept, the first rank always; the kept mass is
    renormalized and returned in vocabulary order.
    `keras_primer_runtime.generation.filtered_probabilities` is the NumPy
    port of this function.
    """
    logits = ops.cast(logits, "float32")
    vocab = ops.shape(logits)[-1]
    # A stable sort on every backend: tied logits keep the lowest id first, as
    # NumPy's stable argsort does (`torch.topk` orders ties arbitrarily).
    sorted_ids = ops.argsort(-logits, axis=-1)
    sorted_logits = ops.take_along_axis(logits, sorted_ids, axis=-1)
    # Subtract the largest before dividing: differences <= 0 divided by any
    # temperature in [2**-126, 2**126] reach -inf at worst (probability 0);
    # dividing first overflows to inf for logits near 5 at temperature 1e-38.
    scaled = (sorted_logits - sorted_logits[:, :1]) / ops.cast(temperature, "float32")
    probs = ops.softmax(scaled, axis=-1)
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
    Raises `ValueError` with the contract's texts, or, for what only a
    keras-hub sampler gets wrong (`k=0`, `temperature=0`), a text naming the
    contract's equivalent.

    >>> check_sampler(TopPSampler(p=0.9)).top_p
    0.9
    >>> check_sampler(TopKSampler(k=0))
    Traceback (most recent call last):
    ...
    ValueError: `k` of a keras-hub TopKSampler must be an integer >= 1 (it keeps the k most likely tokens). For the contract's top_k=0 (no limit) compile with sampler=ContractSampler(top_k=0, ...). Received: 0
    """
    if isinstance(sampler, ContractSampler):
        return sampler.options
    if isinstance(sampler, GreedySampler):
        return check_sampling(0.0)
    name = type(sampler).__name__
    temperature = getattr(sampler, "temperature", 1.0)
    seed = getattr(sampler, "seed", None)
    seed = seed if isinstance(seed, int) else 0
    k = getattr(sampler, "k", None)
    if isinstance(sampler, TopPSampler):
        options = check_sampling(temperature, k or 0, sampler.p, seed)
    elif isinstance(sampler, TopKSampler):
        options = check_sampling(temperature, k, 1.0, seed)
    else:
        options = check_sampling(temperature, 0, 1.0, seed)
    if isinstance(sampler, (TopKSampler, TopPSampler)) and k is not None and k < 1:
        raise ValueError(f"{KERAS_HUB_K_ERROR.format(name=name)} Received: {k!r}")
    if options.greedy:
        raise ValueError(
            f"{KERAS_HUB_TEMPERATURE_ERROR.format(name=name)} Received: {temperature!r}"
        )
    return options


def get_sampler(sampler=None) -> Sampler:
    """`compile`'s `sampler` argument as a sampler instance.

    `None` is the contract's default, `ContractSampler()` (greedy, as the
    SavedModel `generate` signature and `OrtGenerator.generate` default to);
    names and configs go through `keras_hub.samplers.get`. Its options are
    checked by `generate` (`check_sampler`), not here: a `.keras` file
    compiled with a bad sampler still loads.

    >>> type(get_sampler()).__name__, type(get_sampler("greedy")).__name__
    ('ContractSampler', 'GreedySampler')
    """
    return ContractSampler() if sampler is None else keras_hub.samplers.get(sampler)
