"""ONNX export + ONNX Runtime generator: numerics, greedy decoding, int8, errors,
and JAX-/PyTorch-trained `.keras` files."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from export_helpers import NEW_TOKENS, PROMPTS, keras_greedy, make_model, sample_ids

pytestmark = pytest.mark.tensorflow_only

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import keras

    from keras_primer.export import export_model

    root = tmp_path_factory.mktemp("onnx_export")
    lm = make_model()
    model_path = str(root / "tiny.keras")
    lm.save(model_path)
    written = export_model(model_path, str(root / "out"), int8=True, saved_model=False)
    token_ids, padding_mask = sample_ids()
    logits = keras.ops.convert_to_numpy(lm({"token_ids": token_ids, "padding_mask": padding_mask}))
    return {
        "root": root,
        "lm": lm,
        "onnx": written["onnx"],
        "token_ids": token_ids,
        "padding_mask": padding_mask,
        "logits": logits,
        "dir": str(root / "out" / "onnx"),
    }


@pytest.fixture(scope="module")
def generator(exported):
    from keras_primer_runtime.ort_generator import OrtGenerator

    return OrtGenerator(exported["dir"])


def test_files_ir_version_and_dynamic_axes(exported):
    import onnx

    for key in ("model", "decoder_step", "model_int8", "decoder_step_int8", "config", "tokenizer"):
        assert os.path.exists(exported["onnx"][key]), key
    model = onnx.load(exported["onnx"]["model"])
    assert model.ir_version == 8
    dims = {
        i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        for i in model.graph.input
    }
    assert set(dims) == {"input_ids", "attention_mask"}
    assert all(isinstance(d, str) for d in dims["input_ids"])  # batch and length dynamic
    step = onnx.load(exported["onnx"]["decoder_step"])
    # Decoder-with-past names: per layer key/value, then the MDHA conv states.
    past = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [i.name for i in step.graph.input] == ["input_ids", "cache_position"] + past + [
        "conv_state.0",
        "conv_state.1",
    ]
    assert [o.name for o in step.graph.output] == ["logits"] + present + [
        "present_conv_state.0",
        "present_conv_state.1",
    ]
    # Heads first, the past's length dynamic (it grows by each step's tokens).
    key = [d.dim_param or d.dim_value for d in step.graph.input[2].type.tensor_type.shape.dim]
    assert isinstance(key[0], str) and key[1] == 2 and isinstance(key[2], str) and key[3] == 8
    conv = [d.dim_param or d.dim_value for d in step.graph.input[6].type.tensor_type.shape.dim]
    assert isinstance(conv[0], str) and conv[1:] == [3, 2, 2, 8]
    config = json.load(open(exported["onnx"]["config"]))
    assert config["family"] == "primer"
    assert config["states"][4] == {
        "past": "conv_state.0",
        "present": "present_conv_state.0",
        "shape": ["batch", 3, 2, 2, 8],
        "dtype": "float32",
    }
    assert config["tokenizer"]["kind"] == "bytes" and config["tokenizer"]["special_ids"] == [
        0,
        2,
        3,
    ]


def test_ort_logits_match_keras(exported, generator):
    np.testing.assert_allclose(
        generator.logits(exported["token_ids"], exported["padding_mask"]),
        exported["logits"],
        atol=1e-4,
        rtol=0,
    )
    import keras

    ids = exported["token_ids"][:2, :5]
    expected = keras.ops.convert_to_numpy(
        exported["lm"]({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    )
    np.testing.assert_allclose(generator.logits(ids), expected, atol=1e-4, rtol=0)


def test_decoder_step_matches_call_with_cache(exported, generator):
    import keras

    lm = exported["lm"]
    ids = exported["token_ids"][:2, :6]
    cache = lm.empty_cache(2, 9)
    logits, _, cache = lm.call_with_cache(ids[:, :5], cache, 0)
    step_logits, _, cache = lm.call_with_cache(ids[:, 5:6], cache, 5)
    state = generator.empty_state(2)
    ort_logits, state = generator.step(ids[:, :5], 0, state)
    # The past grows: 5 positions after the prefill, 6 after one step.
    assert state["past_key_values.0.key"].shape()[2] == 5
    np.testing.assert_allclose(
        ort_logits, keras.ops.convert_to_numpy(logits)[:, -1], atol=1e-4, rtol=0
    )
    ort_logits, state = generator.step(ids[:, 5:6], 5, state)
    np.testing.assert_allclose(
        ort_logits, keras.ops.convert_to_numpy(step_logits)[:, -1], atol=1e-4, rtol=0
    )
    for layer in range(2):
        for kind in ("key", "value"):
            # The Keras cache is a buffer of 9 positions; the step's past, the 6 written.
            np.testing.assert_allclose(
                state[f"past_key_values.{layer}.{kind}"].numpy(),
                keras.ops.convert_to_numpy(cache[kind][layer])[:, :, :6],
                atol=1e-4,
                rtol=0,
            )
        np.testing.assert_allclose(
            state[f"conv_state.{layer}"].numpy(),
            keras.ops.convert_to_numpy(cache["conv"][layer]),
            atol=1e-4,
            rtol=0,
        )


def test_ort_greedy_matches_keras_greedy(exported, generator):
    expected = keras_greedy(exported["lm"], PROMPTS, NEW_TOKENS)
    assert generator.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == expected
    assert generator.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS) == expected[0]


def test_sampling_is_seeded(generator):
    for options in (dict(top_k=4), dict(top_p=0.8), dict(top_k=4, top_p=0.8)):
        a = generator.generate(PROMPTS, max_new_tokens=5, temperature=1.0, seed=1, **options)
        b = generator.generate(PROMPTS, max_new_tokens=5, temperature=1.0, seed=1, **options)
        assert a == b and all(x.startswith(p) for x, p in zip(a, PROMPTS))
    ids = generator.generate(
        ["Hi"], max_new_tokens=5, temperature=1.0, top_k=1, seed=3, return_token_ids=True
    )
    assert ids == generator.generate(
        ["Hi"], max_new_tokens=5, return_token_ids=True
    )  # top_k=1 is greedy


def test_int8_agreement_is_reported(exported, record_property):
    from keras_primer.export.onnx_int8 import int8_agreement
    from keras_primer_runtime.ort_generator import OrtGenerator

    report = int8_agreement(
        exported["onnx"]["model"],
        exported["onnx"]["model_int8"],
        exported["token_ids"],
        exported["padding_mask"],
    )
    fp32 = OrtGenerator(exported["dir"]).generate(
        PROMPTS, max_new_tokens=NEW_TOKENS, return_token_ids=True
    )
    int8 = OrtGenerator(exported["dir"], int8=True).generate(
        PROMPTS, max_new_tokens=NEW_TOKENS, return_token_ids=True
    )
    same = [a == b for a, b in zip(fp32, int8)]
    report["greedy_sequences_identical"] = f"{sum(same)}/{len(same)}"
    record_property("int8_report", json.dumps(report))
    print("int8 vs fp32:", json.dumps(report))
    assert 0.0 < report["max_abs_logit_diff"] < 1.0
    assert report["next_token_agreement"] >= 0.5


def test_int8_quantizes_every_projection_but_the_lm_head(exported):
    """`quantize_int8` reaches tf2onnx's Gemms (the fused QKV and output
    projections) as well as the feed-forward MatMuls, per output channel;
    the LM head, the MatMul `logits` comes from, stays float32."""
    import onnx

    num_layers = exported["lm"].backbone.num_layers
    for key in ("model_int8", "decoder_step_int8"):
        graph = onnx.load(exported["onnx"][key]).graph
        ops = [n.op_type for n in graph.node]
        assert "Gemm" not in ops, key
        # QKV, output projection, feed-forward up and down, in every layer.
        assert ops.count("MatMulInteger") == 4 * num_layers, key
        initializers = {i.name: i for i in graph.initializer}
        for node in graph.node:
            if node.op_type == "MatMulInteger":
                scale = initializers[node.input[1].replace("_quantized", "_scale")]
                assert scale.dims[0] > 1, f"{key}: {node.name} is not per channel"
        producers = {out: n for n in graph.node for out in n.output}
        head = producers["logits"]
        while head.op_type != "MatMul":
            head = producers[head.input[0]]
        assert initializers[head.input[1]].data_type == onnx.TensorProto.FLOAT, key


def _matmul_graph(path, inside_loop):
    """`logits = (x @ W) @ H` with constant W and H; with `inside_loop`, the
    first product runs in a one-iteration `Loop` body, as a Feedback model's
    layers do."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "W")
    head = numpy_helper.from_array(rng.normal(size=(8, 8)).astype(np.float32), "H")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 8])
    if inside_loop:
        body = helper.make_graph(
            [
                helper.make_node("Identity", ["cond_in"], ["cond_out"]),
                helper.make_node("MatMul", ["x", "W"], ["h_out"]),
            ],
            "body",
            [
                helper.make_tensor_value_info("i", TensorProto.INT64, []),
                helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                helper.make_tensor_value_info("h_in", TensorProto.FLOAT, [2, 8]),
            ],
            [
                helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
                helper.make_tensor_value_info("h_out", TensorProto.FLOAT, [2, 8]),
            ],
            [weight],  # the body's own constant, as tf2onnx writes a loop's weights
        )
        first = [
            helper.make_node(
                "Constant", [], ["trips"], value=helper.make_tensor("t", TensorProto.INT64, [], [1])
            ),
            helper.make_node(
                "Constant",
                [],
                ["cond"],
                value=helper.make_tensor("c", TensorProto.BOOL, [], [True]),
            ),
            helper.make_node("Loop", ["trips", "cond", "x"], ["h"], body=body),
        ]
    else:
        first = [helper.make_node("MatMul", ["x", "W"], ["h"])]
    graph = helper.make_graph(
        [*first, helper.make_node("MatMul", ["h", "H"], ["logits"], name="lm_head")],
        "g",
        [x],
        [logits],
        [head] if inside_loop else [weight, head],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def test_int8_refuses_a_graph_with_nothing_to_quantize(tmp_path):
    """A weight MatMul inside a `Loop` (a Feedback model's layers) is out of
    the quantizer's reach: `--int8` refuses rather than write an "int8" file
    that computes in float32. The same product outside the Loop is quantized."""
    import onnx

    from keras_primer.export.onnx_int8 import quantize_int8
    from keras_primer_cli.errors import ExportError

    flat = _matmul_graph(str(tmp_path / "flat.onnx"), inside_loop=False)
    out = quantize_int8(flat, str(tmp_path / "flat.int8.onnx"), "{}")
    assert "MatMulInteger" in [n.op_type for n in onnx.load(out).graph.node]
    looped = _matmul_graph(str(tmp_path / "step.onnx"), inside_loop=True)
    with pytest.raises(ExportError, match=r"--int8: .* in step\.onnx outside an ONNX Loop"):
        quantize_int8(looped, str(tmp_path / "step.int8.onnx"), "{}")
    assert not (tmp_path / "step.int8.onnx").exists()


def test_bad_inputs_give_clear_errors(generator):
    with pytest.raises(ValueError, match="integer token ids"):
        generator.logits(np.ones((1, 3), "float32"))
    with pytest.raises(ValueError, match=r"shape \[batch, length\]"):
        generator.logits(np.ones((3,), "int32"))
    with pytest.raises(ValueError, match="max_sequence_length=32"):
        generator.logits(np.ones((1, 40), "int32"))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        generator.logits(np.full((1, 3), 256, "int32"))
    with pytest.raises(ValueError, match="padding_mask"):
        generator.logits(np.ones((1, 3), "int32"), np.ones((1, 4), "int32"))
    with pytest.raises(ValueError, match="empty"):
        generator.generate(["ok", ""])
    with pytest.raises(ValueError, match="list of strings"):
        generator.generate([7])
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate(["ok"], max_new_tokens=40)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate(["ok"], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generator.generate(["ok"], temperature=1.0, top_p=0.0)
    state = generator.empty_state(1)
    with pytest.raises(ValueError, match="must hold the 3 positions before"):
        generator.step(np.ones((1, 1), "int32"), 3, state)
    with pytest.raises(ValueError, match="float32"):
        generator.step(
            np.ones((1, 1), "int32"),
            0,
            dict(state, **{"conv_state.0": state["conv_state.0"].astype("float64")}),
        )
    with pytest.raises(ValueError, match="batch"):
        generator.step(np.ones((2, 1), "int32"), 0, state)


def test_cuda_provider_preferred_when_available(monkeypatch):
    import onnxruntime

    from keras_primer_runtime import ort_generator

    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    assert ort_generator.default_providers()[0] == "CUDAExecutionProvider"
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert ort_generator.default_providers() == ["CPUExecutionProvider"]


def test_cuda_requested_but_not_loadable_is_loud(exported, monkeypatch):
    """Never a silent CPU fallback: missing from this onnxruntime, or offered
    but dropped by the session (its libraries failed to load)."""
    import onnxruntime

    from keras_primer_runtime.ort_generator import OrtGenerator

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(RuntimeError, match="CUDAExecutionProvider"):
            OrtGenerator(
                exported["dir"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
            )
    monkeypatch.setattr(
        onnxruntime,
        "get_available_providers",
        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    real = onnxruntime.InferenceSession

    class CpuOnly(real):
        def get_providers(self):
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(
        onnxruntime,
        "InferenceSession",
        lambda path, *args, providers=None: CpuOnly(
            path, *args, providers=["CPUExecutionProvider"]
        ),
    )
    with pytest.raises(RuntimeError, match="could not load"):
        OrtGenerator(exported["dir"], providers=["CUDAExecutionProvider", "CPUExecutionProvider"])


def test_single_thread_session_gives_the_same_text(exported, generator):
    from keras_primer_runtime.ort_generator import OrtGenerator

    single = OrtGenerator(
        exported["dir"], providers=["CPUExecutionProvider"], intra_op_num_threads=1
    )
    assert single.generate(PROMPTS, max_new_tokens=NEW_TOKENS) == generator.generate(
        PROMPTS, max_new_tokens=NEW_TOKENS
    )
    with pytest.raises(ValueError, match="intra_op_num_threads"):
        OrtGenerator(exported["dir"], intra_op_num_threads=0)


def test_conversion_survives_a_failing_tf2onnx_optimizer(monkeypatch, tmp_path):
    """The export turns off tf2onnx's copy of the graph before each optimizer
    (most of its time); when an optimizer then fails, the conversion runs
    again on tf2onnx's safe path, which skips that optimizer. The environment
    variable it sets is restored either way."""
    import onnxruntime as ort
    import tensorflow as tf
    import tf2onnx.convert
    import tf2onnx.optimizer

    from keras_primer.export import onnx_export

    class FailingOptimizer:
        graph_been_opt = False

        def optimize(self, graph, iteration):
            raise RuntimeError("optimizer bug")

    monkeypatch.setitem(tf2onnx.optimizer._optimizers, "failing", FailingOptimizer)
    monkeypatch.delenv(onnx_export.CATCH_ERRORS_VARIABLE, raising=False)
    function = tf.function(lambda x: {"y": tf.nn.relu(x) * 2.0})
    signature = [tf.TensorSpec([None, 3], tf.float32, name="x")]
    # Without the copies, the failure reaches the caller...
    with pytest.raises(RuntimeError, match="optimizer bug"), onnx_export._optimizers_in_place():
        tf2onnx.convert.from_function(function, input_signature=signature, opset=onnx_export.OPSET)
    assert onnx_export.CATCH_ERRORS_VARIABLE not in os.environ
    # ...and `_convert` falls back to the safe path: a correct model.
    path = onnx_export._convert(function, signature, ["y"], str(tmp_path / "relu.onnx"), "{}")
    assert onnx_export.CATCH_ERRORS_VARIABLE not in os.environ
    x = np.array([[-1.0, 0.5, 2.0]], np.float32)
    (y,) = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(["y"], {"x": x})
    np.testing.assert_allclose(y, [[0.0, 1.0, 4.0]])


OTHER_BACKEND_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import keras, numpy as np
from export_helpers import make_model, sample_ids
from keras_primer.export import export_model
root = sys.argv[2]
lm = make_model()
lm.compile(optimizer=keras.optimizers.SGD(0.01))
lm.fit(["To be, or not to be", "that is the question"], batch_size=2, epochs=1, verbose=0)
lm.save(root + "/trained.keras")
ids, mask = sample_ids()
np.save(root + "/logits.npy", keras.ops.convert_to_numpy(lm({"token_ids": ids, "padding_mask": mask})))
if sys.argv[3] == "export":  # the exporter starts its own TensorFlow subprocess
    print(json.dumps(export_model(root + "/trained.keras", root + "/out", name="trained", onnx=False)))
"""


def _op_types(path):
    import onnx

    return sorted(n.op_type for n in onnx.load(path).graph.node)


# JAX: the export is called on the JAX backend (it runs a TensorFlow
# subprocess; SavedModel only, to save time); PyTorch: only training there,
# the SavedModel and ONNX export run in this process.
@pytest.mark.parametrize("backend,where", [("jax", "export"), ("torch", "train-only")])
def test_model_trained_on_other_backend(backend, where, exported, tmp_path):
    import tensorflow as tf

    from keras_primer.export import export_model
    from keras_primer_runtime.ort_generator import OrtGenerator

    env = dict(os.environ, KERAS_BACKEND=backend)
    result = subprocess.run(
        [sys.executable, "-c", OTHER_BACKEND_SCRIPT, TESTS_DIR, str(tmp_path), where],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    if where == "export":
        written = json.loads(result.stdout.strip().splitlines()[-1])
    else:
        written = export_model(
            str(tmp_path / "trained.keras"), str(tmp_path / "out"), name="trained"
        )
    expected = np.load(tmp_path / "logits.npy")
    assert (
        np.abs(expected - exported["logits"]).max() > 1e-4
    )  # the training step changed the weights
    if "onnx" in written:
        ort_logits = OrtGenerator(written["onnx"]["config"].rsplit("/", 1)[0]).logits(
            exported["token_ids"], exported["padding_mask"]
        )
        np.testing.assert_allclose(ort_logits, expected, atol=1e-4, rtol=0)
        # Same artefacts as the TensorFlow-trained export.
        for key in ("model", "decoder_step"):
            assert _op_types(written["onnx"][key]) == _op_types(exported["onnx"][key]), key
    loaded = tf.saved_model.load(written["saved_model"])
    sm_logits = loaded.signatures["serving_default"](
        token_ids=tf.constant(exported["token_ids"]),
        padding_mask=tf.constant(exported["padding_mask"]),
    )["logits"]
    np.testing.assert_allclose(sm_logits.numpy(), expected, atol=1e-4, rtol=0)
    assert sorted(loaded.signatures) == ["generate", "generate_with_options", "serving_default"]
    # The default `max_new_tokens` of a context-32 model leaves room for a prompt
    # (it was 30: every prompt of two or more bytes was refused), and the export
    # replayed its warmup requests before moving the SavedModel into place.
    out = loaded.signatures["generate"](prompts=tf.constant(["To be, or", "Hi"]))
    assert out["num_new_tokens"].numpy().max() <= 15


def test_layer_norms_are_one_onnx_op(exported, tmp_path):
    """tf2onnx spells a Keras LayerNormalization as 13 ops; the export fuses
    each into ONNX's LayerNormalization, with the same outputs, and leaves a
    mean that is not a layer norm alone."""
    import keras
    import onnx
    import onnxruntime as ort
    import tensorflow as tf

    from keras_primer.export import onnx_export

    for key in ("model", "decoder_step"):
        types = [n.op_type for n in onnx.load(exported["onnx"][key]).graph.node]
        # 2 norms per block (2 blocks) and the final one.
        assert types.count("LayerNormalization") == 5 and "GlobalAveragePool" not in types

    norm = keras.layers.LayerNormalization(epsilon=1e-3)
    norm.build((None, None, 8))
    norm.set_weights([np.linspace(0.5, 2.0, 8, dtype="float32"), np.arange(8, dtype="float32")])
    x = np.random.default_rng(0).normal(size=(2, 3, 8)).astype("float32")

    def both(x):
        # Another mean (of another tensor: tf2onnx merges identical nodes).
        return [norm(x), tf.reduce_mean(x * 2.0, axis=-1, keepdims=True)]

    path = onnx_export._convert(
        tf.function(both),
        [tf.TensorSpec([None, None, 8], tf.float32, name="x")],
        ["normed", "mean"],
        str(tmp_path / "norm.onnx"),
        "{}",
    )
    types = [n.op_type for n in onnx.load(path).graph.node]
    assert types.count("LayerNormalization") == 1 and types.count("GlobalAveragePool") == 1
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    normed, mean = session.run(["normed", "mean"], {"x": x})
    np.testing.assert_allclose(normed, keras.ops.convert_to_numpy(norm(x)), atol=1e-5)
    np.testing.assert_allclose(mean, x.mean(-1, keepdims=True) * 2.0, atol=1e-6)
