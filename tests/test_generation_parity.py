"""Parity matrix: {Primer EZ, Feedback} x {bytes, SentencePiece}.

Each model is saved on the current backend and exported (`export_model`,
which runs the export under TensorFlow). The greedy text of Keras `generate`,
of the SavedModel `generate` signature in a fresh process that can import
only TensorFlow and tensorflow-text, and of `OrtGenerator` in a fresh process
that can import no framework at all, must be identical, for a batch of
prompts of different lengths. In each runtime a fixed seed repeats, and bad
options and prompts that are not valid Unicode (the contract's Unicode rule)
fail with the contract's error text.
"""

import json
import os
import subprocess
import sys

import pytest
from export_helpers import BLOCK_IMPORTS, FRAMEWORKS, keras_greedy, make_lm

from keras_primer_runtime import decoding

pytestmark = pytest.mark.slow

CASES = [(f, t) for f in ("primer", "feedback") for t in ("bytes", "sentencepiece")]
PROMPTS = ["Hello", "Hi", "To be, or not"]
NEW_TOKENS = 6
SAMPLING = dict(temperature=1.0, top_k=8, top_p=0.9, seed=11)
BAD = [  # (options, expected text)
    (dict(temperature=-1.0), decoding.TEMPERATURE_ERROR),
    (dict(temperature=float("nan")), decoding.TEMPERATURE_ERROR),
    (dict(temperature=1.0, top_p=1.5), decoding.TOP_P_ERROR),
    (dict(temperature=1.0, top_p=0.0), decoding.TOP_P_ERROR),
    (dict(temperature=1.0, top_k=-1), decoding.TOP_K_ERROR),
]
# Not valid Unicode: invalid UTF-8, and a lone surrogate (a str; a client that
# sends it to TF Serving can only send its "surrogatepass" bytes).
BAD_UNICODE = [b"\xff\xfeA", "a\udcff"]


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
cases, prompts, new_tokens, sampling, bad, bad_unicode, out_path = json.loads(sys.argv[1])
result = {}
for name, sm_dir in cases.items():
    loaded = tf.saved_model.load(sm_dir)
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
    result[name] = {"greedy": [x.decode("utf-8") for x in greedy], "sampled": [run(**sampling), run(**sampling)],
                    "errors": errors}
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
from keras_primer_runtime.ort_generator import OrtGenerator
cases, prompts, new_tokens, sampling, bad, bad_unicode, out_path = json.loads(sys.argv[1])
result = {}
for name, onnx_dir in cases.items():
    gen = OrtGenerator(onnx_dir, providers=["CPUExecutionProvider"])
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
    result[name] = {"greedy": gen.generate(prompts, new_tokens),
                    "sampled": [gen.generate(prompts, new_tokens, **sampling) for _ in range(2)], "errors": errors}
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
        [cases, PROMPTS, NEW_TOKENS, SAMPLING, [b for b, _ in BAD], bad_unicode, str(out)]
    )
    result = subprocess.run(
        [sys.executable, "-c", script, args], capture_output=True, text=True, env=env, timeout=1800
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_same_text_in_keras_savedmodel_and_ort(tmp_path):
    from keras_hub.samplers import TopPSampler

    from keras_primer.export import export_model

    keras_text, saved_models, onnx_dirs = {}, {}, {}
    for family, tokenizer in CASES:
        name = f"{family}_{tokenizer}"
        lm = make_lm(family, tokenizer)
        path = str(tmp_path / f"{name}.keras")
        lm.save(path)
        written = export_model(path, str(tmp_path / name), name=name, max_new_tokens=NEW_TOKENS)
        saved_models[name] = written["saved_model"]
        onnx_dirs[name] = os.path.dirname(written["onnx"]["config"])
        keras_text[name] = keras_greedy(lm, PROMPTS, NEW_TOKENS)
        # Keras refuses the same bad options with the same text.
        for options, text in BAD:
            lm.compile(
                sampler=TopPSampler(
                    p=options.get("top_p", 0.9),
                    k=options.get("top_k") or None,
                    temperature=options.get("temperature", 1.0),
                )
            )
            if options.get("top_k", 0) < 0:
                continue  # keras-hub's TopPSampler has no negative k; checked in the contract tests
            with pytest.raises(
                ValueError, match="^" + text.replace("(", r"\(").replace(")", r"\)")
            ):
                lm.generate("Hi", max_length=8)
        lm.compile(sampler="greedy")
        for prompt in BAD_UNICODE:
            with pytest.raises(ValueError) as error:
                lm.generate(prompt, max_length=8)
            assert str(error.value).startswith(decoding.UNICODE_ERROR), name

    served = _fresh(SAVED_MODEL_SCRIPT, saved_models, tmp_path, "saved_model")
    ort = _fresh(ORT_SCRIPT, onnx_dirs, tmp_path, "ort")
    assert served.pop("modules") == []
    for name in keras_text:
        assert (
            len({len(x) for x in keras_text[name]}) == 3
        )  # prompts of different lengths, non-trivial text
        assert served[name]["greedy"] == keras_text[name], name
        assert ort[name]["greedy"] == keras_text[name], name
        for runtime in (served, ort):
            first, second = runtime[name]["sampled"]
            assert first == second and all(t.startswith(p) for t, p in zip(first, PROMPTS))
            expected = [text for _, text in BAD] + [decoding.UNICODE_ERROR] * len(BAD_UNICODE)
            assert len(runtime[name]["errors"]) == len(expected)
            for text, message in zip(expected, runtime[name]["errors"]):
                assert message is not None and text in message, (name, text, message)
