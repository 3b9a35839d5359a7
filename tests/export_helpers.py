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
def sentencepiece_proto(vocabulary_size=None):
    """Proto of a BPE model (`SENTENCEPIECE_VOCAB` pieces unless given)
    trained on ~15 KB of generated lines."""
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
        return train_sentencepiece([path], vocabulary_size or SENTENCEPIECE_VOCAB).proto


#: `make_lm`'s older family names, as registry names.
FAMILY_ALIASES = {"primer": "primer_ez"}


def make_lm(family="primer", tokenizer="bytes", seed=0, use_dconv=True, shared_kv=True):
    """Tiny causal LM with `tokenizer` ("bytes" | "sentencepiece") and large
    random weights (numpy-drawn: the same on every backend), in the global
    dtype policy. `family`: a registry name (`keras_primer_cli.model_registry.
    MODELS`: "primer_ez", "transformer", "feedback", "feedback_primer_ez",
    built with the entry's backbone switches) or "primer" (= "primer_ez";
    `use_dconv=False` drops the convolutions); `shared_kv` for the Feedback
    families."""
    import keras

    from keras_primer.models.registry import causal_lm_class
    from keras_primer_cli.model_registry import get_model_entry

    entry = get_model_entry(FAMILY_ALIASES.get(family, family))
    lm_cls = causal_lm_class(entry)
    keras.utils.set_random_seed(seed)
    if tokenizer == "sentencepiece":
        from keras_primer.tokenizers import PrimerSentencePieceTokenizer

        tok, vocab = PrimerSentencePieceTokenizer(proto=sentencepiece_proto()), SENTENCEPIECE_VOCAB
    else:
        tok, vocab = lm_cls.preprocessor_cls.tokenizer_cls(), 256
    sizes = dict(
        vocabulary_size=vocab,
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=32,
    )
    args = dict(entry.backbone_args)
    if family == "primer":
        args["use_dconv"] = use_dconv
    if entry.family == "feedback":
        args["shared_kv"] = shared_kv
    backbone = lm_cls.backbone_cls(**sizes, **args)
    lm = lm_cls(backbone, lm_cls.preprocessor_cls(tok, sequence_length=32))
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


def keras_text(lm, prompts, new_tokens):
    """Keras `generate` with the compiled sampler, one prompt at a time
    (Keras' `max_length` is per batch): `new_tokens` new tokens at most each."""
    tokenizer = lm.preprocessor.tokenizer
    texts = []
    for p in prompts:
        length = len(np.asarray(tokenizer(p)).reshape(-1)) + 1
        texts.append(lm.generate(p, max_length=length + new_tokens))
    return texts


def keras_greedy(lm, prompts, new_tokens):
    """`keras_text` with the greedy sampler (memoized per model)."""
    memo = lm.__dict__.setdefault("_export_test_greedy", {})
    missing = [p for p in prompts if (p, new_tokens) not in memo]
    if missing:
        lm.compile(sampler="greedy")
        memo.update(
            {(p, new_tokens): t for p, t in zip(missing, keras_text(lm, missing, new_tokens))}
        )
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


# Prepended to a script run as `python -c SCRIPT WHERE ARGV...` that sends
# itself SIGINT (what Ctrl-C sends) at the point its `where` names:
# `interrupt()` at once, `interrupt_during_gc()` inside a garbage collection
# (where a raised `KeyboardInterrupt` is printed and lost).
SIGINT_PREAMBLE = r"""
import gc, os, signal, sys

from keras_primer_cli.logging_setup import quiet_backend_logs

quiet_backend_logs(False)  # as `keras-primer` does first
where = sys.argv[1]

def interrupt():
    os.kill(os.getpid(), signal.SIGINT)

def interrupt_during_gc():
    def collecting(phase, info):
        if phase == "start":
            gc.callbacks.remove(collecting)
            interrupt()
            sum(range(1000))  # the handler runs here, inside the collection

    gc.callbacks.append(collecting)
    gc.collect()
"""
