"""Shared pieces of the export tests: tiny, non-trivial Primer EZ and Feedback
models, with the byte tokenizer or a small SentencePiece model."""

import functools
import os
import tempfile

import numpy as np

PROMPTS = ["Hello", "Hi", "To be, or"]
NEW_TOKENS = 6
SENTENCEPIECE_VOCAB = 320

# A few KB of text to train a small SentencePiece model on, in the test.
_WORDS = (
    "to be or not the question whether tis nobler in mind suffer slings arrows "
    "outrageous fortune take arms against sea of troubles and by opposing end them "
    "hello hi my lord good night sweet prince"
).split()


@functools.cache
def sentencepiece_proto():
    """Proto of a 320-piece BPE model trained on ~15 KB of generated lines."""
    from keras_primer.data.sentencepiece_training import train_sentencepiece

    rng = np.random.default_rng(0)
    lines = [
        " ".join(rng.choice(_WORDS, size=rng.integers(4, 12))).capitalize() + "."
        for _ in range(300)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "text.txt")
        with open(path, "w") as f:
            f.write("\n".join(lines))
        return train_sentencepiece([path], SENTENCEPIECE_VOCAB).proto


def make_lm(family="primer", tokenizer="bytes", seed=0, use_dconv=True, shared_kv=True):
    """Tiny causal LM with `tokenizer` ("bytes" | "sentencepiece") and large
    random weights (numpy-drawn: the same on every backend). `family`:
    "primer" (`use_dconv` False gives the baseline), "feedback", or
    "feedback_primer_ez" (Feedback with MDHA and squared ReLU); `shared_kv`
    for the Feedback families."""
    import keras

    from keras_primer import (
        FeedbackBackbone,
        FeedbackCausalLM,
        FeedbackCausalLMPreprocessor,
        FeedbackTokenizer,
        PrimerBackbone,
        PrimerCausalLM,
        PrimerCausalLMPreprocessor,
        PrimerTokenizer,
    )

    keras.utils.set_random_seed(seed)
    if tokenizer == "sentencepiece":
        from keras_primer.tokenizers import PrimerSentencePieceTokenizer

        tok, vocab = PrimerSentencePieceTokenizer(proto=sentencepiece_proto()), SENTENCEPIECE_VOCAB
    else:
        tok, vocab = (PrimerTokenizer() if family == "primer" else FeedbackTokenizer()), 256
    sizes = dict(
        vocabulary_size=vocab,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )
    if family == "primer":
        lm = PrimerCausalLM(
            PrimerBackbone(use_dconv=use_dconv, **sizes),
            PrimerCausalLMPreprocessor(tok, sequence_length=32),
        )
    else:
        primer_ez = family == "feedback_primer_ez"
        backbone = FeedbackBackbone(
            shared_kv=shared_kv,
            use_dconv=primer_ez,
            activation="squared_relu" if primer_ez else "relu",
            **sizes,
        )
        lm = FeedbackCausalLM(backbone, FeedbackCausalLMPreprocessor(tok, sequence_length=32))
    return _randomize(lm, seed)


def make_model(use_dconv=True, seed=0):
    """Tiny Primer EZ LM with large random weights (greedy output is not one
    repeated byte, so off-by-one positions or cache mistakes change it)."""
    return make_lm("primer", "bytes", seed, use_dconv)


def _randomize(lm, seed):
    rng = np.random.default_rng(seed)
    lm.set_weights(
        [
            (rng.normal(0, 0.3, w.shape) + (1.0 if "gamma" in v.path else 0.0)).astype("float32")
            if w.ndim <= 1
            else rng.normal(0, 0.3, w.shape).astype("float32")
            for v, w in zip(lm.weights, lm.get_weights())
        ]
    )
    return lm


def keras_greedy(lm, prompts, new_tokens):
    """Keras greedy `generate`, one prompt at a time (Keras' `max_length` is
    per batch; memoized per model): `new_tokens` new tokens at most each."""
    memo = lm.__dict__.setdefault("_export_test_greedy", {})
    missing = [p for p in prompts if (p, new_tokens) not in memo]
    if missing:
        lm.compile(sampler="greedy")
        tokenizer = lm.preprocessor.tokenizer
        for p in missing:
            length = len(np.asarray(tokenizer(p)).reshape(-1)) + 1
            memo[(p, new_tokens)] = lm.generate(p, max_length=length + new_tokens)
    return [memo[(p, new_tokens)] for p in prompts]


def sample_ids(seed=0):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(0, 256, (3, 11)).astype("int32")
    padding_mask = np.ones_like(token_ids)
    padding_mask[1, 7:] = 0  # right padding
    padding_mask[2, :3] = 0  # left padding
    return token_ids, padding_mask


# Prepended to scripts run in a fresh interpreter: `import name` (or of a
# submodule) raises ImportError and `importlib.util.find_spec(name)` is None,
# as if the package were not installed (TensorFlow probes for keras that way).
BLOCK_IMPORTS = r"""
import sys
def block_imports(*names):
    for name in names:
        sys.modules[name] = None
"""
FRAMEWORKS = (
    "keras",
    "keras_hub",
    "keras_primer",
    "tensorflow",
    "tensorflow_text",
    "tf_keras",
    "jax",
    "torch",
)
