"""The decoding contract: one set of sampling semantics, checks and error
texts, one tokenizer and state description, read by Keras `generate`, the
SavedModel signatures and the ONNX Runtime generator."""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from export_helpers import BLOCK_IMPORTS, FRAMEWORKS, make_lm

from keras_primer_runtime import generation

OPTIONS = [
    dict(temperature=1.0, top_k=0, top_p=1.0),
    dict(temperature=0.7, top_k=5, top_p=1.0),
    dict(temperature=1.3, top_k=0, top_p=0.6),
    dict(temperature=0.5, top_k=7, top_p=0.9),
    dict(temperature=2.0, top_k=1, top_p=1.0),
    dict(temperature=1.0, top_k=0, top_p=1e-6),
]
BAD_OPTIONS = [
    (dict(temperature=-1.0), generation.TEMPERATURE_ERROR),
    (dict(temperature=math.nan), generation.TEMPERATURE_ERROR),
    (dict(temperature=math.inf), generation.TEMPERATURE_ERROR),
    (dict(temperature=1.0, top_p=0.0), generation.TOP_P_ERROR),
    (dict(temperature=1.0, top_p=1.5), generation.TOP_P_ERROR),
    (dict(temperature=1.0, top_p=math.nan), generation.TOP_P_ERROR),
    (dict(temperature=1.0, top_k=-2), generation.TOP_K_ERROR),
]
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _logits(seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (4, 50)).astype("float32")
    logits[1, :3] = logits[1, 10]  # ties
    return logits


@pytest.mark.parametrize("options", OPTIONS)
def test_filtered_distribution_numpy_port_matches_keras_ops(options):
    from keras_primer.generation import filtered_probabilities

    logits = _logits()
    expected = generation.filtered_probabilities(logits, generation.check_sampling(**options))
    got = keras.ops.convert_to_numpy(filtered_probabilities(logits, **options))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(expected.sum(-1), 1.0, atol=1e-5)


@pytest.mark.tensorflow_only  # backend-independent: runs once
def test_filtered_distribution_oracle():
    """Hand-computed: softmax([2, 1, 0, -1] / 1) keeps ranks whose preceding mass < 0.7."""
    logits = np.array([[2.0, 1.0, 0.0, -1.0]], "float32")
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()  # 0.644, 0.237, 0.087, 0.032
    got = generation.filtered_probabilities(logits, generation.check_sampling(1.0, top_p=0.7))
    np.testing.assert_allclose(
        got[0], [p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0, 0], atol=1e-6
    )
    got = generation.filtered_probabilities(
        logits[:, ::-1], generation.check_sampling(1.0, top_k=1)
    )
    np.testing.assert_allclose(got[0], [0, 0, 0, 1], atol=0)


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("options", OPTIONS)
def test_filtered_distribution_savedmodel_graph_matches(options):
    """The SavedModel traces `filtered_probabilities` with TensorFlow in a graph."""
    import tensorflow as tf

    from keras_primer.generation import filtered_probabilities

    graph_fn = tf.function(filtered_probabilities, jit_compile=False, autograph=False)
    got = graph_fn(
        tf.constant(_logits(1)),
        tf.constant(options["temperature"]),
        tf.constant(options["top_k"]),
        tf.constant(options["top_p"]),
    ).numpy()
    expected = generation.filtered_probabilities(_logits(1), generation.check_sampling(**options))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bad,message", BAD_OPTIONS)
def test_bad_options_same_text_in_keras_and_runtime(bad, message):
    from keras_hub.samplers import TopKSampler, TopPSampler

    from keras_primer.generation import ContractSampler, check_sampler

    with pytest.raises(ValueError) as runtime_error:
        generation.check_sampling(**bad)
    assert str(runtime_error.value).startswith(message)
    with pytest.raises(ValueError) as keras_error:
        ContractSampler(**bad)
    assert str(keras_error.value) == str(runtime_error.value)
    # keras-hub samplers given to `compile` go through the same checks.
    if bad.get("top_k", 0) >= 0:
        sampler = TopPSampler(
            p=bad.get("top_p", 0.9),
            k=bad.get("top_k") or None,
            temperature=bad.get("temperature", 1.0),
        )
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
            check_sampler(sampler)
    with pytest.raises(ValueError, match="top_k"):
        check_sampler(TopKSampler(k=-1))


@pytest.mark.parametrize(
    "sampler_args",
    [
        dict(p=0.0),
        dict(p=1.5),
        dict(p=0.9, temperature=-1.0),
        dict(p=0.9, temperature=float("nan")),
    ],
)
def test_keras_generate_refuses_bad_keras_hub_sampler(sampler_args):
    """Regression (issue 12): these were accepted and gave garbage (or, with
    NaN, an empty completion on JAX)."""
    from keras_hub.samplers import TopPSampler

    lm = make_lm("primer", "bytes")
    lm.compile(sampler=TopPSampler(**sampler_args))
    with pytest.raises(ValueError, match="must be a"):
        lm.generate("Hi", max_length=8)


def test_keras_contract_sampler_is_seeded_and_greedy_at_zero():
    from keras_primer.generation import ContractSampler

    lm = make_lm("primer", "bytes")
    runs = []
    for _ in range(2):
        lm.compile(sampler=ContractSampler(temperature=1.0, top_k=20, seed=5))
        runs.append(lm.generate(["Hello", "Hi"], max_length=14))
    assert runs[0] == runs[1]
    lm.compile(sampler=ContractSampler(temperature=0.0))
    greedy = lm.generate("Hello", max_length=14)
    lm.compile(sampler="greedy")
    assert greedy == lm.generate("Hello", max_length=14)
    restored = ContractSampler.from_config(ContractSampler(0.5, 3, 0.8, 9).get_config())
    assert restored.options == generation.check_sampling(0.5, 3, 0.8, 9)


@pytest.mark.parametrize("family", ["primer", "feedback"])
def test_state_specs_describe_empty_cache(family):
    """The layout the exporters read is the one `empty_cache` builds."""
    lm = make_lm(family, "bytes")
    cache = lm.empty_cache(3, 7)
    specs = lm.decoding_state_specs()
    assert [s.name for s in specs] == list(cache)
    for spec in specs:
        assert tuple(cache[spec.name].shape) == spec.concrete(3, 7)


def test_tokenizer_spec_round_trip_and_refusals():
    from keras_primer.models.primer.primer_causal_lm_preprocessor import PrimerCausalLMPreprocessor
    from keras_primer.tokenizers import tokenizer_spec

    spec, proto = tokenizer_spec(make_lm("primer", "bytes"))
    assert (spec.kind, spec.vocabulary_size, spec.special_ids, proto) == (
        "bytes",
        256,
        [0, 2, 3],
        None,
    )
    assert generation.TokenizerSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    spec, proto = tokenizer_spec(make_lm("feedback", "sentencepiece"))
    assert spec.kind == "sentencepiece" and proto[:2] and spec.special_ids == [0, 2, 3]
    lm = make_lm("primer", "bytes")
    lm.preprocessor = None
    with pytest.raises(ValueError, match="no preprocessor/tokenizer"):
        tokenizer_spec(lm)
    from keras_hub.tokenizers import ByteTokenizer

    lm.preprocessor = PrimerCausalLMPreprocessor(ByteTokenizer(), sequence_length=8)
    with pytest.raises(ValueError, match="tokenizer is a ByteTokenizer"):
        tokenizer_spec(lm)


@pytest.mark.tensorflow_only  # backend-independent: runs once
def test_length_and_prompt_checks():
    assert generation.check_max_new_tokens(2**31 - 1) == 2**31 - 1
    with pytest.raises(ValueError, match="max_sequence_length=32"):
        generation.check_max_new_tokens(2**31 - 1, longest_prompt=3, max_sequence_length=32)
    for bad in (0, -1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="max_new_tokens"):
            generation.check_max_new_tokens(bad)
    with pytest.raises(
        ValueError, match=generation.EMPTY_PROMPT_ERROR.replace("(", r"\(").replace(")", r"\)")
    ):
        generation.check_prompts(["a", ""])
    for bad in ([], [3], None):
        with pytest.raises(ValueError, match="list of strings"):
            generation.check_prompts(bad)


@pytest.mark.tensorflow_only
def test_runtime_imports_without_any_framework():
    """`keras_primer_runtime` modules import (and decode) with the frameworks blocked."""
    script = (
        BLOCK_IMPORTS
        + f"""
block_imports(*{FRAMEWORKS!r})
import numpy as np
from keras_primer_runtime import generation, ort_generator, serving_client
import onnxruntime, sentencepiece
probs = generation.filtered_probabilities(np.array([[1.0, 2.0]]), generation.check_sampling(1.0))
try:
    import tensorflow
    print("tensorflow importable")
except ImportError:
    pass
print(sorted(m for m in sys.modules if m.split(".")[0] in {FRAMEWORKS!r} and sys.modules[m]),
      round(float(probs[0, 1]), 4))
"""
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=1800, cwd=TESTS_DIR
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[]", "0.7311"]


@pytest.mark.tensorflow_only
def test_export_refuses_unknown_tokenizer_before_writing(tmp_path):
    from keras_hub.tokenizers import ByteTokenizer

    from keras_primer.export.onnx_export import export_onnx
    from keras_primer.export.saved_model import export_saved_model
    from keras_primer.models.primer.primer_causal_lm_preprocessor import PrimerCausalLMPreprocessor

    lm = make_lm("primer", "bytes")
    lm.preprocessor = PrimerCausalLMPreprocessor(ByteTokenizer(lowercase=False), sequence_length=8)
    with pytest.raises(ValueError, match="tokenizer is a ByteTokenizer"):
        export_saved_model(lm, str(tmp_path / "serving"), "m", 1, default_max_new_tokens=4)
    with pytest.raises(ValueError, match="tokenizer is a ByteTokenizer"):
        export_onnx(lm, str(tmp_path / "onnx"))
    lm.preprocessor = None
    with pytest.raises(ValueError, match="no preprocessor"):
        export_onnx(lm, str(tmp_path / "onnx"))
    assert list(tmp_path.iterdir()) == []


# === One tokenizer module, one codec per kind ===
def test_tokenizer_classes_live_in_one_module_and_keep_their_names():
    import keras_primer
    from keras_primer import tokenizers
    from keras_primer.models.feedback import FeedbackBackbone
    from keras_primer.models.primer import PrimerBackbone
    from keras_primer.tokenizers import FeedbackTokenizer, PrimerTokenizer

    assert PrimerTokenizer is tokenizers.PrimerTokenizer is keras_primer.PrimerTokenizer
    assert FeedbackTokenizer is tokenizers.FeedbackTokenizer
    assert keras_primer.PrimerSentencePieceTokenizer is tokenizers.PrimerSentencePieceTokenizer
    for cls in (PrimerTokenizer, FeedbackTokenizer, tokenizers.PrimerSentencePieceTokenizer):
        assert cls.__module__ == "keras_primer.tokenizers"
        assert keras.saving.get_registered_name(cls) == f"keras_primer>{cls.__name__}"
    # keras-hub finds a preset's tokenizer class by `backbone_cls`.
    assert PrimerTokenizer.backbone_cls is PrimerBackbone
    assert FeedbackTokenizer.backbone_cls is FeedbackBackbone


def test_one_codec_per_kind_for_corpus_keras_and_ort(tmp_path):
    """Corpus encoding, the exported runtimes and the Keras tokenizers share
    the runtime's codec classes, and agree on ids."""
    from keras_primer import data
    from keras_primer.tokenizers import PrimerSentencePieceTokenizer, PrimerTokenizer

    text = "ROMEO: é 你 😀\nthe end"
    corpus = tmp_path / "c.txt"
    corpus.write_text(text, encoding="utf-8")
    meta = data.encode_corpus(str(corpus), generation.ByteCodec(), str(tmp_path / "cache"))
    assert meta["codec"] == {"kind": "bytes", "vocabulary_size": 256}
    cached = np.fromfile(str(tmp_path / "cache" / "tokens.bin"), dtype=np.uint8)
    keras_ids = np.asarray(PrimerTokenizer()(text))
    np.testing.assert_array_equal(cached[: len(keras_ids)], keras_ids)

    from export_helpers import sentencepiece_proto

    sp = PrimerSentencePieceTokenizer(proto=sentencepiece_proto())
    for tokenizer in (PrimerTokenizer(), sp):
        spec = tokenizer.tokenizer_spec()
        # What an export writes, read back as the ONNX Runtime generator does.
        export_dir = tmp_path / spec.kind
        export_dir.mkdir()
        spec.save(str(export_dir), None if spec.kind == "bytes" else bytes(tokenizer.proto))
        loaded_spec, codec = generation.load_tokenizer(str(export_dir))
        assert loaded_spec == spec
        assert type(codec) is type(tokenizer.codec())
        assert type(codec) in (generation.ByteCodec, generation.SentencePieceCodec)
        sample = "To be, or not é"
        np.testing.assert_array_equal(codec.encode(sample), np.asarray(tokenizer(sample)))
        assert codec.decode([spec.start_id, *codec.encode(sample), spec.end_id]) == sample


def test_tokenizer_that_changes_tokenize_cannot_describe_itself():
    from keras_primer.tokenizers import PrimerTokenizer

    class Shouting(PrimerTokenizer):
        def tokenize(self, inputs):
            return super().tokenize(inputs)

    with pytest.raises(ValueError, match="overrides `tokenize`"):
        Shouting().tokenizer_spec()
    with pytest.raises(ValueError, match="lowercase"):
        PrimerTokenizer(lowercase=True).tokenizer_spec()


# === Samplers given to `compile` ===
def test_compile_defaults_to_the_contract_sampler():
    from keras_primer.generation import ContractSampler

    lm = make_lm("primer", "bytes")
    lm.compile()
    assert isinstance(lm.sampler, ContractSampler) and lm.sampler.options.greedy
    default = lm.generate(["Hello", "Hi"], max_length=12)
    lm.compile(sampler="greedy")
    assert default == lm.generate(["Hello", "Hi"], max_length=12)


@pytest.mark.parametrize(
    "make_sampler,text",
    [
        (lambda s: s.TopKSampler(k=0), "`k` of a keras-hub TopKSampler must be an integer >= 1"),
        (lambda s: s.TopPSampler(p=0.5, k=0), "`k` of a keras-hub TopPSampler must be"),
        (lambda s: s.TopKSampler(temperature=0), "`temperature` of a keras-hub TopKSampler"),
        (lambda s: s.RandomSampler(temperature=0.0), "`temperature` of a keras-hub RandomSampler"),
    ],
)
def test_keras_hub_sampler_checked_before_first_token(make_sampler, text):
    """Regression (issue 20 item 5): a raw InvalidArgumentError (or NaN
    logits) from inside the generation loop before."""
    import keras_hub

    lm = make_lm("primer", "bytes")
    lm.compile(sampler=make_sampler(keras_hub.samplers))
    with pytest.raises(ValueError, match="^" + text.replace("(", r"\(")) as error:
        lm.generate("Hi", max_length=8)
    assert "ContractSampler" in str(error.value)


# === The Unicode rule ===
BAD_UNICODE = [b"\xff\xfeA", "a\udcff", [b"ok", b"a\xed\xb3\xbf"]]


@pytest.mark.parametrize("prompt", BAD_UNICODE)
def test_unicode_rule_in_the_contract_and_codecs(prompt):
    with pytest.raises(ValueError) as error:
        generation.check_prompts(prompt)
    assert str(error.value).startswith(generation.UNICODE_ERROR)
    assert generation.check_prompts([b"caf\xc3\xa9", "ok \ufffd"]) == ["café", "ok \ufffd"]
    if isinstance(prompt, str):
        with pytest.raises(ValueError, match="lone surrogate"):
            generation.ByteCodec().encode(prompt)


@pytest.mark.parametrize("tokenizer", ["bytes", "sentencepiece"])
def test_unicode_rule_in_keras_generate(tokenizer):
    """Regression (issue 20 item 6): UnicodeDecodeError, a TypeError, a
    RuntimeError with terminal colour codes, or generated text, before."""
    lm = make_lm("primer", tokenizer)
    lm.compile(sampler="greedy")
    for prompt in BAD_UNICODE:
        with pytest.raises(ValueError) as error:
            lm.generate(prompt, max_length=12)
        message = str(error.value)
        assert message.startswith(generation.UNICODE_ERROR) and "\x1b[" not in message
