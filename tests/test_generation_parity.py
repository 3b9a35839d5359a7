"""Parity matrix: {Keras on TensorFlow, JAX, PyTorch} x {every exportable model
of the registry (Primer EZ, the Transformer baseline, Feedback, Feedback +
MDHA), with bytes; Primer EZ and Feedback with SentencePiece; Feedback + MDHA
with per-layer K/V} x {Keras, SavedModel, ONNX Runtime}.

Each model (numpy-drawn random weights) is saved once and exported once
(`export_model`, under TensorFlow). Keras loads the saved file and generates
on every backend (TensorFlow in the test process, JAX and PyTorch in fresh
processes); the SavedModel `generate` signature runs in a fresh process that
can import only TensorFlow and tensorflow-text, and `OrtGenerator` in a fresh
process that can import no framework at all. The greedy text must be
identical everywhere, for a batch of prompts of different lengths, and so
must the full forward pass's logits (`model.onnx`, `serving_default`). In each
runtime a fixed seed repeats, and bad options and prompts that are not valid
Unicode (the contract's Unicode rule) fail with the contract's error text.
ONNX Runtime's stream joins to the greedy text, and its decoding step's past
grows by each step's tokens (not a buffer sized for the request).
Runs once, in the TensorFlow-backend pass (it covers every backend itself).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from export_helpers import (
    BLOCK_IMPORTS,
    FRAMEWORKS,
    keras_greedy,
    keras_text,
    make_lm,
    sample_ids,
)

from keras_primer_cli.model_registry import MODELS
from keras_primer_runtime import generation

pytestmark = pytest.mark.slow
# A hang guard only: many times the normal time on a loaded 2-core machine.
HANG_GUARD_S = 1800

# name -> `make_lm` arguments: the registry's exportable models (what
# `keras-primer train --model` makes) with bytes, two with SentencePiece.
CASES = {
    f"{name}_bytes": dict(family=name, tokenizer="bytes")
    for name, entry in MODELS.items()
    if entry.exportable
}
for name in ("primer_ez", "feedback"):
    CASES[f"{name}_sentencepiece"] = dict(family=name, tokenizer="sentencepiece")
CASES["feedback_primer_ez_per_layer"] = dict(family="feedback_primer_ez", shared_kv=False)
KERAS_BACKENDS = ("tensorflow", "jax", "torch")
# Keras samples with one sampler class for every model: its edge and bad
# options are checked once per decoding loop (Primer's cached loop, Feedback's
# memory loop), on every backend. Each exported graph checks them all.
KERAS_SAMPLER_CASES = ("primer_ez_bytes", "feedback_bytes")
PROMPTS = ["Hello", "Hi", "To be, or not"]
NEW_TOKENS = 6
SAMPLING = dict(temperature=1.0, top_k=8, top_p=0.9, seed=11)
BAD = [  # (options, expected text)
    (dict(temperature=-1.0), generation.TEMPERATURE_ERROR),
    (dict(temperature=float("nan")), generation.TEMPERATURE_ERROR),
    (dict(temperature=1.0, top_p=1.5), generation.TOP_P_ERROR),
    (dict(temperature=1.0, top_p=0.0), generation.TOP_P_ERROR),
    (dict(temperature=1.0, top_k=-1), generation.TOP_K_ERROR),
    # Just outside the float32 bounds (issue 32), as float32 numbers, so the
    # SavedModel sees them as sent: a subnormal, and above 2**126.
    (dict(temperature=2.0**-127), generation.TEMPERATURE_ERROR),
    (dict(temperature=1e38), generation.TEMPERATURE_ERROR),
    (dict(temperature=1.0, top_p=2.0**-127), generation.TOP_P_ERROR),
]
# At the bounds every runtime's seeded sample is the argmax: the greedy text
# (issue 32: NaN in ONNX Runtime, greedy by accident in the SavedModel, a raw
# error on Keras-TensorFlow, the prompt alone on Keras-JAX before).
EDGE = [
    dict(temperature=generation.MIN_TEMPERATURE, seed=3),
    dict(temperature=generation.MIN_TEMPERATURE, top_k=5, top_p=0.9, seed=3),
    dict(temperature=1.0, top_p=generation.MIN_TOP_P, seed=3),
]
# Not valid Unicode: invalid UTF-8, and a lone surrogate (a str; a client that
# sends it to TF Serving can only send its "surrogatepass" bytes).
BAD_UNICODE = [b"\xff\xfeA", "a\udcff"]
# Characters that the byte tokenizer encodes as special ids (pad, start, end):
# refused with the contract's text (issue 32: decoding dropped them from the
# text). SentencePiece never encodes text as a special id: kept in the text.
SPECIAL = ["a\x00b", "Hi\x02", "\x03"]
# The full forward pass (Keras `call`, the SavedModel's `serving_default`,
# ORT's `model.onnx`) on these ids, without padding: the same logits.
LOGITS_IDS = sample_ids()[0]


def _as_bytes(prompt):
    return prompt if isinstance(prompt, bytes) else prompt.encode("utf-8", "surrogatepass")


SAVED_MODEL_SCRIPT = (
    BLOCK_IMPORTS
    + r"""
block_imports("keras", "keras_hub", "keras_primer", "tf_keras", "jax", "torch")
import importlib.util, json, os
import tensorflow as tf
# The SentencePiece kernels alone: `import tensorflow_text` would import Keras
# (its package imports tf.keras layers), which this process cannot.
text_dir = importlib.util.find_spec("tensorflow_text").submodule_search_locations[0]
tf.load_op_library(os.path.join(text_dir, "python", "ops", "_sentencepiece_tokenizer.so"))
cases, prompts, new_tokens, sampling, edge, bad, bad_unicode, special, ids, out_path = json.loads(sys.argv[1])
result = {}
for name, sm_dir in cases.items():
    loaded = tf.saved_model.load(sm_dir)
    logits = loaded.signatures["serving_default"](
        token_ids=tf.constant(ids, tf.int32), padding_mask=tf.ones([len(ids), len(ids[0])], tf.int32)
    )["logits"].numpy().tolist()
    greedy = loaded.signatures["generate"](prompts=tf.constant(prompts))["outputs"].numpy()
    options = loaded.signatures["generate_with_options"]
    def run(temperature=0.0, top_k=0, top_p=1.0, seed=0, max_new_tokens=new_tokens):
        out = options(prompts=tf.constant(prompts), max_new_tokens=tf.constant(max_new_tokens),
                      temperature=tf.constant(temperature, tf.float32), top_k=tf.constant(top_k),
                      top_p=tf.constant(top_p, tf.float32), seed=tf.constant(seed))
        return [x.decode("utf-8") for x in out["outputs"].numpy()]
    errors = []
    for options_ in bad:
        try:
            run(**options_)
            errors.append(None)
        except tf.errors.InvalidArgumentError as e:
            errors.append(e.message)
    for _, prompt in bad_unicode:  # the bytes a client sends, as hex
        try:
            loaded.signatures["generate"](prompts=tf.constant([bytes.fromhex(prompt)]))
            errors.append(None)
        except tf.errors.InvalidArgumentError as e:
            errors.append(e.message)
    special_out = []
    for prompt in special:
        try:
            out = loaded.signatures["generate"](prompts=tf.constant([prompt.encode("utf-8")]))
            special_out.append({"text": out["outputs"].numpy()[0].decode("utf-8")})
        except tf.errors.InvalidArgumentError as e:
            special_out.append({"error": e.message})
    result[name] = {"greedy": [x.decode("utf-8") for x in greedy], "sampled": [run(**sampling), run(**sampling)],
                    "special": special_out,
                    "edge": [run(**options_) for options_ in edge], "errors": errors, "logits": logits}
result["modules"] = sorted(m for m in sys.modules
                           if m.split(".")[0] in ("keras", "keras_primer", "jax", "torch") and sys.modules[m])
json.dump(result, open(out_path, "w"))
"""
)

ORT_SCRIPT = (
    BLOCK_IMPORTS
    + f"""
block_imports(*{FRAMEWORKS!r})
"""
    + r"""
import json
import numpy as np
from keras_primer_runtime.ort_generator import OrtGenerator
cases, prompts, new_tokens, sampling, edge, bad, bad_unicode, special, ids, out_path = json.loads(sys.argv[1])
result = {}
for name, onnx_dir in cases.items():
    gen = OrtGenerator(onnx_dir, providers=["CPUExecutionProvider"])
    logits = gen.logits(np.array(ids, np.int32)).tolist()
    errors = []
    for options in bad:
        try:
            gen.generate(prompts, new_tokens, **options)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    for kind, prompt in bad_unicode:  # the prompt itself: bytes (as hex) or a str
        try:
            gen.generate(bytes.fromhex(prompt) if kind == "hex" else prompt, new_tokens)
            errors.append(None)
        except ValueError as e:
            errors.append(str(e))
    special_out = []
    for prompt in special:
        try:
            special_out.append({"text": gen.generate(prompt, new_tokens)})
        except ValueError as e:
            special_out.append({"error": str(e)})
    # The step's past grows by each step's tokens (prefill 4, then one at a
    # time) and the last step's logits equal the full pass's (row 0 of ids).
    row = np.array(ids[:1], np.int32)
    state = gen.empty_state(1)
    step_logits, state = gen.step(row[:, :4], 0, state)
    lengths = []
    for position in range(4, row.shape[1]):
        lengths.append(sorted({state[t["past"]].shape()[t["shape"].index("length")]
                               for t in gen.state_tensors if "length" in t["shape"]}))
        step_logits, state = gen.step(row[:, position:position + 1], position, state)
    result[name] = {"greedy": gen.generate(prompts, new_tokens), "logits": logits, "special": special_out,
                    "stream": ["".join(gen.stream(p, new_tokens)) for p in prompts],
                    "growth": lengths, "step_logits": step_logits.tolist(),
                    "sampled": [gen.generate(prompts, new_tokens, **sampling) for _ in range(2)], "errors": errors,
                    "edge": [gen.generate(prompts, new_tokens, **options) for options in edge],
                    "config": {k: gen.config[k] for k in ("family", "states")}}
json.dump(result, open(out_path, "w"))
"""
)


def _fresh(script, cases, tmp_path, name):
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    if name == "ort":  # the prompts as given
        bad_unicode = [
            ["hex", p.hex()] if isinstance(p, bytes) else ["str", p] for p in BAD_UNICODE
        ]
    else:
        bad_unicode = [["hex", _as_bytes(p).hex()] for p in BAD_UNICODE]
    args = json.dumps(
        [
            cases,
            PROMPTS,
            NEW_TOKENS,
            SAMPLING,
            EDGE,
            [b for b, _ in BAD],
            bad_unicode,
            SPECIAL,
            LOGITS_IDS.tolist(),
            str(out),
        ]
    )
    result = subprocess.run(
        [sys.executable, "-c", script, args],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG_GUARD_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def keras_side(lm, name):
    """Keras greedy text of `lm`, after checking (on every backend) that the
    edge options give it, that bad options fail with the contract's text
    (`KERAS_SAMPLER_CASES`), and the prompt checks."""
    from keras_hub.samplers import TopPSampler

    from keras_primer.generation import ContractSampler

    text = keras_greedy(lm, PROMPTS, NEW_TOKENS)
    if name not in KERAS_SAMPLER_CASES:
        return _keras_prompt_checks(lm, name, text)
    for options in EDGE:
        lm.compile(sampler=ContractSampler(**options))
        assert keras_text(lm, PROMPTS, NEW_TOKENS) == text, (name, options)
    for options, message in BAD:
        if options.get("top_k", 0) < 0:
            continue  # keras-hub's TopPSampler has no negative k; checked in the contract tests
        lm.compile(
            sampler=TopPSampler(
                p=options.get("top_p", 0.9),
                k=options.get("top_k") or None,
                temperature=options.get("temperature", 1.0),
            )
        )
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            lm.generate("Hi", max_length=8)
    lm.compile(sampler="greedy")
    return _keras_prompt_checks(lm, name, text)


def _keras_prompt_checks(lm, name, text):
    """Prompts that are not valid Unicode or that hold special ids: the
    contract's errors (SentencePiece keeps special characters as text)."""
    for prompt in BAD_UNICODE:
        with pytest.raises(ValueError) as error:
            lm.generate(prompt, max_length=8)
        assert str(error.value).startswith(generation.UNICODE_ERROR), name
    for prompt in SPECIAL:
        if _kind(lm) == "sentencepiece":
            assert lm.generate(prompt, max_length=8).startswith(prompt), name
        else:
            with pytest.raises(ValueError) as error:
                lm.generate(prompt, max_length=8)
            assert str(error.value).startswith(generation.SPECIAL_TOKEN_ERROR), name
    return text


def _kind(lm):
    return lm.preprocessor.tokenizer.tokenizer_spec().kind


# Keras on another backend, in a fresh process: loads the files the test wrote.
KERAS_SCRIPT = r"""
import json, sys
cases, tests_dir, out_path = json.loads(sys.argv[1])
sys.path.insert(0, tests_dir)
import keras
import keras_primer  # noqa: F401  (registers the classes the files name)
from test_generation_parity import keras_side
result = {name: keras_side(keras.saving.load_model(path), name) for name, path in cases.items()}
json.dump({"backend": keras.backend.backend(), "text": result}, open(out_path, "w"))
"""


def _start_keras(backend, paths, tmp_path):
    out = tmp_path / f"keras_{backend}.json"
    env = dict(os.environ, KERAS_BACKEND=backend)
    args = json.dumps([paths, os.path.dirname(__file__), str(out)])
    # Output to a file: a pipe read only at the end could fill and stall the child.
    log = open(tmp_path / f"keras_{backend}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-c", KERAS_SCRIPT, args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log.close()  # the child holds its own copy
    return process, out


def _finish_keras(backend, process, out):
    process.wait(timeout=HANG_GUARD_S)
    log = out.with_name(f"keras_{backend}.log").read_text()
    assert process.returncode == 0, f"{backend}: {log[-3000:]}"
    result = json.loads(out.read_text())
    assert result["backend"] == backend
    return result["text"]


@pytest.mark.tensorflow_only
def test_same_text_in_keras_savedmodel_and_ort(tmp_path):
    import keras

    from keras_primer.export import export_model

    assert set(KERAS_SAMPLER_CASES) <= set(CASES)
    paths = {}
    for name, options in CASES.items():
        paths[name] = str(tmp_path / f"{name}.keras")
        make_lm(**options).save(paths[name])
    # JAX and PyTorch work in fresh processes while this one exports.
    started = {b: _start_keras(b, paths, tmp_path) for b in KERAS_BACKENDS if b != "tensorflow"}
    loaded = {name: keras.saving.load_model(path) for name, path in paths.items()}
    keras_text = {"tensorflow": {name: keras_side(lm, name) for name, lm in loaded.items()}}
    keras_logits = {
        name: keras.ops.convert_to_numpy(
            lm({"token_ids": LOGITS_IDS, "padding_mask": np.ones_like(LOGITS_IDS)})
        )
        for name, lm in loaded.items()
    }
    saved_models, onnx_dirs = {}, {}
    for name, path in paths.items():
        written = export_model(path, str(tmp_path / name), name=name, max_new_tokens=NEW_TOKENS)
        saved_models[name] = written["saved_model"]
        onnx_dirs[name] = os.path.dirname(written["onnx"]["config"])
    for backend, (process, out) in started.items():
        keras_text[backend] = _finish_keras(backend, process, out)
    served = _fresh(SAVED_MODEL_SCRIPT, saved_models, tmp_path, "saved_model")
    ort = _fresh(ORT_SCRIPT, onnx_dirs, tmp_path, "ort")
    assert served.pop("modules") == []
    for name in CASES:
        reference = keras_text["tensorflow"][name]
        # prompts of different lengths, non-trivial text
        assert len({len(x) for x in reference}) == 3, (name, reference)
        for backend in KERAS_BACKENDS:
            assert keras_text[backend][name] == reference, (name, backend)
        assert served[name]["greedy"] == reference, name
        assert ort[name]["greedy"] == reference, name
        assert ort[name]["stream"] == reference, name  # streamed pieces joined
        assert ort[name]["growth"] == [[n] for n in range(4, LOGITS_IDS.shape[1])], name
        np.testing.assert_allclose(
            ort[name]["step_logits"], keras_logits[name][0, -1:], atol=1e-4, rtol=0, err_msg=name
        )
        for runtime in (served, ort):
            assert runtime[name]["edge"] == [reference] * len(EDGE), name
        for runtime in (served, ort):
            np.testing.assert_allclose(
                runtime[name]["logits"], keras_logits[name], atol=1e-4, rtol=0, err_msg=name
            )
        # The ONNX config names the family and its decoding state (the
        # Feedback state: keys/values of the memory of past steps).
        family = MODELS[CASES[name]["family"]].family
        assert ort[name]["config"]["family"] == family, name
        if name.startswith("feedback_bytes"):
            assert [s["past"] for s in ort[name]["config"]["states"]] == [
                "past_key_values.memory.key",
                "past_key_values.memory.value",
            ]
        for runtime in (served, ort):
            first, second = runtime[name]["sampled"]
            assert first == second and all(t.startswith(p) for t, p in zip(first, PROMPTS))
            expected = [text for _, text in BAD] + [generation.UNICODE_ERROR] * len(BAD_UNICODE)
            assert len(runtime[name]["errors"]) == len(expected)
            for text, message in zip(expected, runtime[name]["errors"]):
                assert message is not None and text in message, (name, text, message)
            for prompt, out in zip(SPECIAL, runtime[name]["special"], strict=True):
                if CASES[name].get("tokenizer") == "sentencepiece":
                    assert out["text"].startswith(prompt), (name, prompt, out)
                else:
                    assert generation.SPECIAL_TOKEN_ERROR in out["error"], (name, prompt, out)
