"""Shared pieces of the export tests: a tiny, non-trivial Primer model."""

import numpy as np

PROMPTS = ["Hello", "Hi", "To be, or"]
NEW_TOKENS = 6


def make_model(use_dconv=True, seed=0):
    """Tiny Primer EZ LM with large random weights (greedy output is not one
    repeated byte, so off-by-one positions or cache mistakes change it)."""
    import keras

    from keras_primer import (
        PrimerBackbone,
        PrimerCausalLM,
        PrimerCausalLMPreprocessor,
        PrimerTokenizer,
    )

    keras.utils.set_random_seed(seed)
    backbone = PrimerBackbone(
        vocabulary_size=256, num_layers=2, num_heads=2, hidden_dim=16,
        intermediate_dim=32, max_sequence_length=32, use_dconv=use_dconv,
    )
    lm = PrimerCausalLM(backbone, PrimerCausalLMPreprocessor(PrimerTokenizer(), sequence_length=32))
    rng = np.random.default_rng(seed)
    lm.set_weights([
        (rng.normal(0, 0.3, w.shape) + (1.0 if "gamma" in v.path else 0.0)).astype("float32")
        if w.ndim <= 1 else rng.normal(0, 0.3, w.shape).astype("float32")
        for v, w in zip(lm.weights, lm.get_weights())
    ])
    return lm


def keras_greedy(lm, prompts, new_tokens):
    """Keras greedy `generate`, one prompt at a time (memoized per model)."""
    memo = lm.__dict__.setdefault("_export_test_greedy", {})
    missing = [p for p in prompts if (p, new_tokens) not in memo]
    if missing:
        lm.compile(sampler="greedy")
        for p in missing:
            memo[(p, new_tokens)] = lm.generate(p, max_length=len(p.encode()) + 1 + new_tokens)
    return [memo[(p, new_tokens)] for p in prompts]


def sample_ids(seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, 256, (3, 11)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 7:] = 0  # right padding
    padding_mask[2, :3] = 0  # left padding
    return token_ids, padding_mask
