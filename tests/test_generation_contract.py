"""The decoding contract: one set of sampling semantics, checks and error
texts, one tokenizer and state description, read by Keras `generate`, the
SavedModel signatures and the ONNX Runtime generator."""

import json
import math
import os
import re
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
    # Below float32's smallest normal number (2**-126): 0 to TensorFlow and JAX.
    (dict(temperature=1e-46), generation.TEMPERATURE_ERROR),
    (dict(temperature=2.0**-127), generation.TEMPERATURE_ERROR),
    (dict(temperature=1e38), generation.TEMPERATURE_ERROR),  # > 2**126
    (dict(temperature=1e39), generation.TEMPERATURE_ERROR),  # inf in float32
    (dict(temperature=1.0, top_p=1e-50), generation.TOP_P_ERROR),
    (dict(temperature=1.0, top_p=2.0**-127), generation.TOP_P_ERROR),
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
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            check_sampler(sampler)
    with pytest.raises(ValueError, match="top_k"):
        check_sampler(TopKSampler(k=-1))


# === The float32 bounds of the sampling options (issue 32) ===
# At the bounds: the smallest temperature samples the argmax, the smallest
# top_p keeps the top token only, the largest temperature is (nearly) uniform.
EDGE_OPTIONS = [
    dict(temperature=generation.MIN_TEMPERATURE),
    dict(temperature=generation.MIN_TEMPERATURE, top_k=3, top_p=0.5),
    dict(temperature=1.0, top_p=generation.MIN_TOP_P),
    dict(temperature=generation.MAX_TEMPERATURE),
]


def _wide_logits():
    """Logits near 5 (5 / 2**-126 overflows float32), ties, and a row whose
    range exceeds float32 (its differences overflow to -inf)."""
    logits = _logits(2) + 5.0
    logits[2, :4] = [3e38, -3e38, 1.0, 3e38]
    return logits


@pytest.mark.tensorflow_only  # backend-independent: runs once
def test_sampling_bounds_are_float32_normal_numbers():
    tiny = np.finfo(np.float32)
    assert generation.MIN_TEMPERATURE == generation.MIN_TOP_P == float(tiny.smallest_normal)
    # The temperature and its reciprocal (XLA may multiply by it) are normal.
    assert generation.MAX_TEMPERATURE == 1 / generation.MIN_TEMPERATURE
    for value in (generation.MIN_TEMPERATURE, generation.MAX_TEMPERATURE):
        assert float(np.float32(value)) == value  # exact in float32
    for options in EDGE_OPTIONS + [dict(temperature=-0.0)]:
        generation.check_sampling(**options)
    below = float(np.nextafter(np.float64(generation.MIN_TEMPERATURE), 0))
    above = float(np.nextafter(np.float64(generation.MAX_TEMPERATURE), math.inf))
    for bad in (
        dict(temperature=below),
        dict(temperature=above),
        dict(temperature=1.0, top_p=below),
    ):
        with pytest.raises(ValueError, match="2\\*\\*-126"):
            generation.check_sampling(**bad)


@pytest.mark.parametrize("options", EDGE_OPTIONS)
def test_edge_options_have_one_distribution_in_numpy_and_keras_ops(options):
    """Regression (issue 32): logits were divided before the largest was
    subtracted, so 5 / 2**-126 = inf and inf - inf = NaN."""
    from keras_primer.generation import filtered_probabilities

    logits = _wide_logits()
    checked = generation.check_sampling(**options)
    expected = generation.filtered_probabilities(logits, checked)
    got = keras.ops.convert_to_numpy(
        filtered_probabilities(logits, checked.temperature, checked.top_k, checked.top_p)
    )
    assert np.isfinite(expected).all() and np.isfinite(got).all()
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)
    np.testing.assert_allclose(expected.sum(-1), 1.0, atol=1e-5)
    top = logits == logits.max(-1, keepdims=True)  # row 2: two tied maxima
    if options == dict(temperature=generation.MIN_TEMPERATURE):
        # The argmax alone, or the tied maxima evenly.
        np.testing.assert_allclose(expected, top / top.sum(-1, keepdims=True), atol=1e-6)
    if checked.top_p == generation.MIN_TOP_P:
        # The first most likely token alone (the first of tied maxima).
        np.testing.assert_array_equal(expected, np.eye(logits.shape[-1])[logits.argmax(-1)])
    if checked.temperature == generation.MAX_TEMPERATURE:
        np.testing.assert_allclose(expected[0], 1 / logits.shape[-1], rtol=1e-5)


@pytest.mark.tensorflow_only
def test_savedmodel_option_checks_use_the_float32_bounds():
    """The graph reads a subnormal float32 as 0 (`1e-40 > 0` is False on
    TensorFlow's CPU), so its asserts look at the bits: the same values as
    `check_sampling` pass and fail, with the same texts."""
    import tensorflow as tf

    from keras_primer.export.generation_graph import GenerationGraph

    @tf.function(autograph=False)
    def check(temperature, top_p):
        with tf.control_dependencies(
            GenerationGraph.option_checks(temperature, tf.constant(0), top_p, tf.constant(0))
        ):
            return tf.constant(True)

    cases = [dict(temperature=0.0), dict(temperature=-0.0)] + EDGE_OPTIONS
    cases += [dict(temperature=t) for t in (2.0**-127, 1e-40, -1e-40, 1e38, 1e39, math.nan)]
    cases += [dict(temperature=1.0, top_p=p) for p in (2.0**-127, 1e-40, 0.0, -1.0, 1.5)]
    for options in cases:
        temperature, top_p = options["temperature"], options.get("top_p", 1.0)
        args = (tf.constant(temperature, tf.float32), tf.constant(top_p, tf.float32))
        try:
            generation.check_sampling(temperature=temperature, top_p=top_p)
        except ValueError as error:
            text = str(error).split(" Received:")[0]
            with pytest.raises(tf.errors.InvalidArgumentError) as graph_error:
                check(*args)
            assert text in graph_error.value.message, options
        else:
            assert check(*args).numpy(), options


def test_keras_generate_at_the_bounds_is_greedy_and_below_is_refused():
    """At the smallest temperature and top_p a seeded sample is the greedy
    text, with the contract's sampler and with keras-hub's (which divides
    before its softmax subtracts the largest: `generate_step` hands it
    logits whose largest is 0); just below, both refuse with the contract's
    text before the first token (regression, issue 32: a raw
    InvalidArgumentError on TensorFlow, the prompt alone on JAX)."""
    from keras_hub.samplers import TopKSampler, TopPSampler

    from keras_primer.generation import ContractSampler

    lm = make_lm("feedback", "bytes")
    lm.compile(sampler="greedy")
    greedy = lm.generate(["Hello", "Hi"], max_length=12)
    assert all(len(text) > len(prompt) for text, prompt in zip(greedy, ["Hello", "Hi"]))
    edge = generation.MIN_TEMPERATURE
    samplers = [
        ContractSampler(temperature=edge, seed=3),
        ContractSampler(temperature=1.0, top_p=generation.MIN_TOP_P, seed=3),
        TopPSampler(p=0.9, temperature=edge, seed=3),
        TopKSampler(k=5, temperature=edge, seed=3),
        TopPSampler(p=generation.MIN_TOP_P, seed=3),
    ]
    for sampler in samplers:
        lm.compile(sampler=sampler)
        assert lm.generate(["Hello", "Hi"], max_length=12) == greedy, sampler.get_config()
    below = 2.0**-127
    for make, text in [
        (lambda: ContractSampler(temperature=below), generation.TEMPERATURE_ERROR),
        (lambda: TopPSampler(p=0.9, temperature=below), generation.TEMPERATURE_ERROR),
        (lambda: TopPSampler(p=below), generation.TOP_P_ERROR),
        (lambda: ContractSampler(temperature=1.0, top_p=below), generation.TOP_P_ERROR),
    ]:
        with pytest.raises(ValueError, match="^" + re.escape(text)):
            lm.compile(sampler=make())
            lm.generate("Hello", max_length=12)


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
def test_generate_refuses_a_row_without_prompt_tokens(family):
    """Regression (issue 32): a token-id row whose padding mask is all 0 gave a
    raw InvalidArgumentError on TensorFlow, an IndexError on PyTorch and
    garbage on JAX; now a ValueError naming the row, before any decoding."""
    lm = make_lm(family, "bytes")
    lm.compile(sampler="greedy")
    lm.preprocessor = None  # token ids in, token ids out
    ids = np.array([[2, 72, 105, 0, 0, 0], [0] * 6, [2, 84, 0, 0, 0, 0]], "int32")
    mask = (ids > 0).astype("int32")
    for padding_mask in (mask, keras.ops.convert_to_tensor(mask)):
        with pytest.raises(ValueError, match=r"^`padding_mask` row 1 marks no token as real"):
            lm.generate({"token_ids": ids, "padding_mask": padding_mask}, stop_token_ids=None)
    with pytest.raises(ValueError, match=r"row 0 marks no token.*: \[0, 1\]\.$"):
        lm.generate({"token_ids": ids[1:], "padding_mask": 0 * mask[1:]}, stop_token_ids=None)
    out = lm.generate({"token_ids": ids[[0, 2]], "padding_mask": mask[[0, 2]]}, stop_token_ids=None)
    generated = keras.ops.convert_to_numpy(out["token_ids"])
    np.testing.assert_array_equal(generated[:, :2], ids[[0, 2], :2])  # prompts kept
    assert (generated[:, 3:] != 0).any()  # new tokens after the prompts


@pytest.mark.parametrize("family", ["primer", "feedback"])
def test_state_specs_describe_empty_cache(family):
    """The layout the exporters read describes every tensor of the cache
    `empty_cache` builds and `call_with_cache` returns, each once."""
    import keras

    from keras_primer_runtime.generation import structure_get

    lm = make_lm(family, "bytes")
    cache = lm.empty_cache(3, 7)
    specs = lm.decoding_state_specs()
    assert len({s.path for s in specs}) == len(specs) == len(keras.tree.flatten(cache))
    assert len({s.onnx_name for s in specs}) == len(specs)
    _, _, next_cache = lm.call_with_cache(np.ones((3, 1), "int32"), cache, 0)
    assert len(keras.tree.flatten(next_cache)) == len(specs)
    for spec in specs:
        assert tuple(structure_get(cache, spec.path).shape) == spec.concrete(3, 7)
        assert tuple(structure_get(next_cache, spec.path).shape) == spec.concrete(3, 7)


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


# === Special ids never come from a prompt (issue 32) ===
# Characters the byte tokenizer encodes as special ids, and the contract's text.
SPECIAL_PROMPTS = [
    ("a\x00b", "U+0000 at character 1 is the special id 0"),
    ("é\x02", "U+0002 at character 1 is the special id 2"),
    ("\x03", "U+0003 at character 0 is the special id 3"),
]


@pytest.mark.tensorflow_only  # backend-independent: runs once
def test_prompt_ids_refuse_special_ids_and_sentencepiece_never_makes_them():
    """Regression (issue 32): a NUL (pad), STX (start) or ETX (end) in a
    byte-model prompt was silently dropped from the text in every runtime."""
    from export_helpers import sentencepiece_proto

    spec, codec = generation.byte_spec(), generation.ByteCodec()
    for prompt, where in SPECIAL_PROMPTS:
        with pytest.raises(ValueError) as error:
            generation.prompt_ids(spec, codec, prompt)
        expected = f"{generation.SPECIAL_TOKEN_ERROR} Received: {prompt!r} ({where})"
        assert str(error.value) == expected
    assert generation.prompt_ids(spec, codec, "Hi\x01\x04") == [2, 72, 105, 1, 4]
    # SentencePiece: <pad>, <s>, </s> are control pieces, which encoding never
    # produces; control characters become byte pieces and survive decoding.
    sp = generation.SentencePieceCodec(sentencepiece_proto())
    special = set(sp.spec.special_ids)
    for text in [chr(c) for c in range(128)] + ["<pad>", "<s>", "</s>", "a\x00b\x02c\x03"]:
        ids = generation.prompt_ids(sp.spec, sp, text)[1:]
        assert not special & set(ids) and sp.decode(ids) == text, (text, ids)


@pytest.mark.parametrize("family", ["primer", "feedback"])
def test_keras_generate_refuses_special_characters_in_prompts(family):
    lm = make_lm(family, "bytes")
    lm.compile(sampler="greedy")
    for prompt, where in SPECIAL_PROMPTS:
        with pytest.raises(ValueError) as error:
            lm.generate(prompt, max_length=12)
        assert str(error.value) == (
            f"{generation.SPECIAL_TOKEN_ERROR} Received: {prompt!r} ({where})"
        )
    with pytest.raises(ValueError, match=re.escape("Received: prompt 1: 'a\\x00b' (U+0000")):
        lm.generate(["Hi", "a\x00b"], max_length=12)
    lm = make_lm(family, "sentencepiece")
    lm.compile(sampler="greedy")
    assert lm.generate("a\x00b", max_length=8).startswith("a\x00b")


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
