"""SavedModel export for TF Serving: layout, graph rules, numerics, errors."""

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from export_helpers import NEW_TOKENS, PROMPTS, keras_greedy, make_model, sample_ids

pytestmark = pytest.mark.tensorflow_only

# Runs in a fresh interpreter in which keras, keras_hub, keras_primer and
# tensorflow_text cannot be imported: walks the graph against the core op
# registry, loads the SavedModel, calls both signatures, replays warmup.
FRESH_SCRIPT = r"""
import json, os, sys
BLOCKED = ("keras", "keras_hub", "keras_primer", "tensorflow_text", "tf_keras")
for name in BLOCKED:  # `import name` raises ImportError, find_spec(name) is None
    sys.modules[name] = None
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry
from tensorflow_serving.apis import prediction_log_pb2

sm_dir, token_path, out_path = sys.argv[1:4]
proto = saved_model_pb2.SavedModel()
proto.ParseFromString(open(os.path.join(sm_dir, "saved_model.pb"), "rb").read())
bad, ops = [], set()
for mg in proto.meta_graphs:
    lib = {f.signature.name for f in mg.graph_def.library.function}
    nodes = list(mg.graph_def.node)
    for f in mg.graph_def.library.function:
        nodes += list(f.node_def)
    for n in nodes:
        if n.op in lib:
            continue
        ops.add(n.op)
        if n.op.startswith("Xla") or n.op in ("PyFunc", "EagerPyFunc", "_XlaCompile", "_XlaRun") \
                or op_def_registry.get(n.op) is None:
            bad.append(n.op)
loaded = tf.saved_model.load(sm_dir)
data = np.load(token_path)
res = {"bad_ops": sorted(set(bad)), "num_ops": len(ops), "signatures": sorted(loaded.signatures)}
logits = loaded.signatures["serving_default"](
    token_ids=tf.constant(data["token_ids"]), padding_mask=tf.constant(data["padding_mask"]))["logits"]
res["logits"] = logits.numpy().tolist()
short = loaded.signatures["serving_default"](
    token_ids=tf.constant(data["token_ids"][:1, :4]), padding_mask=tf.constant(data["padding_mask"][:1, :4]))
res["logits_short"] = short["logits"].numpy().tolist()
prompts = json.loads(os.environ["PROMPTS"])
out = loaded.signatures["generate_with_options"](
    prompts=tf.constant(prompts), max_new_tokens=tf.constant(int(os.environ["NEW_TOKENS"])),
    temperature=tf.constant(0.0), top_k=tf.constant(0), top_p=tf.constant(1.0), seed=tf.constant(0))
res["greedy"] = [x.decode("utf-8") for x in out["outputs"].numpy()]
res["num_new_tokens"] = out["num_new_tokens"].numpy().tolist()
res["generate_default"] = [x.decode() for x in loaded.signatures["generate"](prompts=tf.constant(prompts[:1]))["outputs"].numpy()]
warm = os.path.join(sm_dir, "assets.extra", "tf_serving_warmup_requests")
replayed = []
for record in tf.data.TFRecordDataset(warm):
    log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
    req = log.predict_log.request
    fn = loaded.signatures[req.model_spec.signature_name]
    outputs = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in req.inputs.items()})
    replayed.append([req.model_spec.signature_name, sorted(outputs)])
res["warmup"] = replayed
res["modules"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED and sys.modules[m] is not None)
try:
    import keras
    res["modules"].append("keras importable")
except ImportError:
    pass
json.dump(res, open(out_path, "w"))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    import keras

    from keras_primer_cli.export import main

    root = tmp_path_factory.mktemp("sm_export")
    lm = make_model()
    model_path = str(root / "tiny.keras")
    lm.save(model_path)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(
            [
                model_path,
                "--out",
                str(root / "out"),
                "--name",
                "tiny",
                "--version",
                "3",
                "--max-new-tokens",
                "4",
                "--no-onnx",
            ]
        )
    assert rc == 0
    token_ids, padding_mask = sample_ids()
    logits = keras.ops.convert_to_numpy(lm({"token_ids": token_ids, "padding_mask": padding_mask}))
    return {
        "root": root,
        "stdout": stdout.getvalue(),
        "lm": lm,
        "token_ids": token_ids,
        "padding_mask": padding_mask,
        "logits": logits,
        "sm_dir": str(root / "out" / "serving" / "tiny" / "3"),
    }


@pytest.fixture(scope="module")
def fresh(exported):
    root = exported["root"]
    np.savez(
        root / "tokens.npz", token_ids=exported["token_ids"], padding_mask=exported["padding_mask"]
    )
    env = dict(os.environ, PROMPTS=json.dumps(PROMPTS), NEW_TOKENS=str(NEW_TOKENS))
    env.pop("KERAS_BACKEND", None)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            FRESH_SCRIPT,
            exported["sm_dir"],
            str(root / "tokens.npz"),
            str(root / "fresh.json"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((root / "fresh.json").read_text())


@pytest.fixture(scope="module")
def loaded(exported):
    import tensorflow as tf

    return tf.saved_model.load(exported["sm_dir"])


def test_command_prints_paths_and_writes_serving_layout(exported):
    sm_dir = exported["sm_dir"]
    assert sm_dir in exported["stdout"]
    config_path = os.path.join(os.path.dirname(os.path.dirname(sm_dir)), "models.config")
    assert config_path in exported["stdout"]
    config = open(config_path).read()
    assert 'name: "tiny"' in config and 'base_path: "/models/tiny"' in config
    assert 'model_platform: "tensorflow"' in config
    for rel in ("saved_model.pb", "variables", "assets.extra/tf_serving_warmup_requests"):
        assert os.path.exists(os.path.join(sm_dir, rel)), rel


def test_weights_are_float32(exported):
    import tensorflow as tf

    reader = tf.train.load_checkpoint(os.path.join(exported["sm_dir"], "variables", "variables"))
    dtypes = {k: v for k, v in reader.get_variable_to_dtype_map().items() if "model_variables" in k}
    assert dtypes and all(v == tf.float32 for v in dtypes.values()), dtypes


def test_graph_rules_hold_and_catch_py_function(exported, tmp_path):
    import tensorflow as tf

    from keras_primer.export.saved_model import check_graph

    ops = check_graph(exported["sm_dir"])
    assert "While" in ops and "UnicodeTranscode" in ops and "DecodeRaw" in ops
    assert not [op for op in ops if op.startswith("Xla") or "PyFunc" in op]

    module = tf.Module()
    module.f = tf.function(
        lambda x: tf.py_function(lambda y: y * 2, [x], tf.float32),
        input_signature=[tf.TensorSpec([None], tf.float32)],
    )
    tf.saved_model.save(module, str(tmp_path / "bad"), signatures=module.f.get_concrete_function())
    with pytest.raises(ValueError, match="EagerPyFunc"):
        check_graph(str(tmp_path / "bad"))

    module.g = tf.function(
        lambda x: x * 2, jit_compile=True, input_signature=[tf.TensorSpec([None], tf.float32)]
    )
    tf.saved_model.save(module, str(tmp_path / "xla"), signatures=module.g.get_concrete_function())
    with pytest.raises(ValueError, match="_XlaMustCompile"):
        check_graph(str(tmp_path / "xla"))


def test_fresh_process_without_keras(exported, fresh):
    assert fresh["modules"] == []
    assert fresh["bad_ops"] == [], fresh["bad_ops"]
    assert {"serving_default", "generate", "generate_with_options"} <= set(fresh["signatures"])
    np.testing.assert_allclose(np.array(fresh["logits"]), exported["logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        np.array(fresh["logits_short"]),
        exported["logits"][:1, :4] * 0 + np.array(fresh["logits_short"]),
        atol=0,
    )
    lm = exported["lm"]
    import keras

    short = keras.ops.convert_to_numpy(
        lm(
            {
                "token_ids": exported["token_ids"][:1, :4],
                "padding_mask": exported["padding_mask"][:1, :4],
            }
        )
    )
    np.testing.assert_allclose(np.array(fresh["logits_short"]), short, atol=1e-4, rtol=0)


def test_generate_matches_keras_greedy(exported, fresh):
    expected = keras_greedy(exported["lm"], PROMPTS, NEW_TOKENS)
    assert fresh["greedy"] == expected
    assert all(0 < n <= NEW_TOKENS for n in fresh["num_new_tokens"])
    # `generate` (prompts only) uses --max-new-tokens 4.
    assert fresh["generate_default"] == keras_greedy(exported["lm"], PROMPTS[:1], 4)


def test_warmup_records_replay(fresh):
    names = [name for name, _ in fresh["warmup"]]
    assert names == ["serving_default", "generate", "generate_with_options"]
    assert fresh["warmup"][0][1] == ["logits"]
    assert fresh["warmup"][1][1] == ["completions", "num_new_tokens", "outputs"]


def test_bad_generate_inputs_give_clear_errors(loaded):
    import tensorflow as tf

    generate = loaded.signatures["generate"]
    options = loaded.signatures["generate_with_options"]
    kwargs = dict(
        temperature=tf.constant(0.0),
        top_k=tf.constant(0),
        top_p=tf.constant(1.0),
        seed=tf.constant(0),
    )
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-empty string"):
        generate(prompts=tf.constant(["ok", ""]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="non-empty list of strings"):
        generate(prompts=tf.constant([], tf.string))
    with pytest.raises(
        tf.errors.InvalidArgumentError, match="max_new_tokens` must be an integer >= 1"
    ):
        options(prompts=tf.constant(["ok"]), max_new_tokens=tf.constant(0), **kwargs)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_sequence_length=32"):
        options(prompts=tf.constant(["ok"]), max_new_tokens=tf.constant(40), **kwargs)
    # Regression (issue 12): near 2**31 the int32 sum wrapped past the check.
    for huge in (2**31 - 1, 2**31 - 3):
        with pytest.raises(tf.errors.InvalidArgumentError, match="max_sequence_length=32"):
            options(prompts=tf.constant(["ok"]), max_new_tokens=tf.constant(huge), **kwargs)
    with pytest.raises(tf.errors.InvalidArgumentError, match="top_p"):
        options(
            prompts=tf.constant(["ok"]),
            max_new_tokens=tf.constant(2),
            **dict(kwargs, top_p=tf.constant(1.5)),
        )
    with pytest.raises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
        generate(prompts=tf.constant([1, 2]))
    # Still serving after the errors.
    assert generate(prompts=tf.constant(["ok"]))["outputs"].shape == (1,)


def test_bad_logits_inputs_give_clear_errors(loaded):
    import tensorflow as tf

    fn = loaded.signatures["serving_default"]
    ids = tf.constant([[2, 300]], tf.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="vocabulary_size=256"):
        fn(token_ids=ids, padding_mask=tf.ones_like(ids))
    with pytest.raises(tf.errors.InvalidArgumentError, match="shape of `token_ids`"):
        fn(token_ids=tf.constant([[2, 3]]), padding_mask=tf.constant([[1, 1, 1]]))
    long_ids = tf.ones([1, 40], tf.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_sequence_length=32"):
        fn(token_ids=long_ids, padding_mask=long_ids)


def test_sampling_options_are_seeded_and_bounded(loaded):
    import tensorflow as tf

    options = loaded.signatures["generate_with_options"]
    kwargs = dict(
        prompts=tf.constant(["Hi", "To be"]),
        max_new_tokens=tf.constant(5),
        temperature=tf.constant(1.0),
        top_k=tf.constant(3),
        top_p=tf.constant(0.9),
    )
    a = options(seed=tf.constant(7), **kwargs)
    b = options(seed=tf.constant(7), **kwargs)
    assert a["outputs"].numpy().tolist() == b["outputs"].numpy().tolist()
    assert all(n <= 5 for n in a["num_new_tokens"].numpy())
    for text, prompt in zip(a["outputs"].numpy(), ["Hi", "To be"]):
        assert text.decode().startswith(prompt)


def test_loaded_object_calls_what_the_signatures_call(loaded, exported):
    """Each signature is also an attribute of the loaded object (the same
    traced function), callable by keyword or position."""
    import tensorflow as tf

    prompts = tf.constant(["Hi", "To be"])
    by_signature = loaded.signatures["generate"](prompts=prompts)["outputs"].numpy().tolist()
    assert loaded.generate(prompts=prompts)["outputs"].numpy().tolist() == by_signature
    assert loaded.generate(prompts)["outputs"].numpy().tolist() == by_signature
    logits = loaded.serving_default(
        token_ids=tf.constant(exported["token_ids"]),
        padding_mask=tf.constant(exported["padding_mask"]),
    )["logits"]
    np.testing.assert_allclose(logits.numpy(), exported["logits"], atol=1e-4, rtol=0)
    options = dict(max_new_tokens=4, temperature=1.0, top_k=3, top_p=0.9, seed=7)
    as_tensors = {k: tf.constant(v) for k, v in options.items()}
    by_attribute = loaded.generate_with_options(prompts=prompts, **options)
    by_signature = loaded.signatures["generate_with_options"](prompts=prompts, **as_tensors)
    assert by_attribute["outputs"].numpy().tolist() == by_signature["outputs"].numpy().tolist()


def test_rest_and_grpc_client_requests(exported, loaded):
    import tensorflow as tf

    from keras_primer_runtime import serving_client as sc

    signature, inputs = sc.generate_inputs(PROMPTS[:2])
    assert signature == "generate"
    for form in ("instances", "inputs"):
        body = sc.rest_body(signature, inputs, form=form)
        json.dumps(body)
        feeds = sc.rest_inputs_to_numpy(signature, body)
        out = loaded.signatures[signature](**{k: tf.constant(v) for k, v in feeds.items()})
        assert [x.decode() for x in out["outputs"].numpy()] == keras_greedy(
            exported["lm"], PROMPTS[:2], 4
        )
    signature, inputs = sc.logits_inputs(exported["token_ids"], exported["padding_mask"])
    for form in ("instances", "inputs"):
        feeds = sc.rest_inputs_to_numpy(signature, sc.rest_body(signature, inputs, form=form))
        out = loaded.signatures[signature](**{k: tf.constant(v) for k, v in feeds.items()})
        np.testing.assert_allclose(out["logits"].numpy(), exported["logits"], atol=1e-4, rtol=0)
    signature, inputs = sc.generate_inputs(
        ["Hi"], max_new_tokens=3, temperature=0.7, top_k=4, seed=3
    )
    request = sc.grpc_request("tiny", signature, inputs, version=3)
    assert request.model_spec.signature_name == "generate_with_options"
    out = loaded.signatures[signature](
        **{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
    )
    assert out["num_new_tokens"].numpy()[0] <= 3
    assert (
        sc.rest_url("localhost", 8501, "tiny", 3)
        == "http://localhost:8501/v1/models/tiny/versions/3:predict"
    )
    with pytest.raises(ValueError, match="instances"):
        sc.rest_body(signature, inputs, form="instances")
    with pytest.raises(ValueError, match="empty"):
        sc.generate_inputs(["ok", ""])
    with pytest.raises(ValueError, match="list of strings"):
        sc.generate_inputs([3])
    # Regressions (issue 12): the client validates like the signatures.
    with pytest.raises(ValueError, match="outside int32"):
        sc.logits_inputs(np.array([[2, 2**40]]))  # astype(int32) made it 0
    with pytest.raises(ValueError, match="temperature"):
        sc.generate_inputs(["ok"], temperature=float("nan"))
    with pytest.raises(ValueError, match="top_p"):
        sc.generate_inputs(["ok"], top_p=1.5)
    with pytest.raises(ValueError, match="int32"):
        sc.generate_inputs(["ok"], max_new_tokens=2**40)
    with pytest.raises(ValueError, match="http"):
        sc.predict_rest("file:///etc/passwd", {})
    with pytest.raises(ValueError, match="max_new_tokens"):
        sc.generate_inputs(["ok"], max_new_tokens=0)
    with pytest.raises(ValueError, match="integer array"):
        sc.logits_inputs(np.ones((2, 3), "float32"))


def _cli(*args):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([cli, *args], capture_output=True, text=True, env=env, timeout=1800)


def test_saved_model_cli_show_and_run(exported, tmp_path):
    sm_dir = exported["sm_dir"]
    shown = _cli("show", "--dir", sm_dir, "--all")
    assert shown.returncode == 0, shown.stderr[-2000:]
    for text in (
        "signature_def['serving_default']",
        "signature_def['generate']",
        "inputs['token_ids']",
        "inputs['prompts']",
        "outputs['logits']",
        "(-1, -1, 256)",
    ):
        assert text in shown.stdout, text
    np.save(tmp_path / "ids.npy", exported["token_ids"])
    np.save(tmp_path / "mask.npy", exported["padding_mask"])
    ran = _cli(
        "run",
        "--dir",
        sm_dir,
        "--tag_set",
        "serve",
        "--signature_def",
        "serving_default",
        "--inputs",
        f"token_ids={tmp_path / 'ids.npy'};padding_mask={tmp_path / 'mask.npy'}",
        "--outdir",
        str(tmp_path / "logits"),
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    np.testing.assert_allclose(
        np.load(tmp_path / "logits" / "logits.npy"), exported["logits"], atol=1e-4, rtol=0
    )
    np.save(tmp_path / "prompts.npy", np.array([p.encode() for p in PROMPTS[:2]]))
    ran = _cli(
        "run",
        "--dir",
        sm_dir,
        "--tag_set",
        "serve",
        "--signature_def",
        "generate",
        "--inputs",
        f"prompts={tmp_path / 'prompts.npy'}",
        "--outdir",
        str(tmp_path / "gen"),
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    outputs = [x.decode() for x in np.load(tmp_path / "gen" / "outputs.npy", allow_pickle=True)]
    assert outputs == keras_greedy(exported["lm"], PROMPTS[:2], 4)


def test_export_refuses_existing_version_and_bad_file(exported, capsys):
    from keras_primer_cli.export import main

    model_path = str(exported["root"] / "tiny.keras")
    out = str(exported["root"] / "out")
    assert main([model_path, "--out", out, "--name", "tiny", "--version", "3", "--no-onnx"]) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert main([str(exported["root"] / "missing.keras"), "--out", out]) == 2
    assert "No model file" in capsys.readouterr().err


def test_a_failing_warmup_record_fails_the_export(exported, tmp_path):
    """The export replays every warmup record (the written one passes); a record
    TF Serving would fail on (here: a prompt longer than the context) is refused."""
    import shutil

    from keras_primer.export.saved_model import replay_warmup, write_warmup
    from keras_primer_cli.errors import ExportError
    from keras_primer_runtime import serving_client as sc

    copy = str(tmp_path / "copy")
    shutil.copytree(exported["sm_dir"], copy)
    replay_warmup(copy)
    good = sc.grpc_request("tiny", *sc.generate_inputs(["Hi"]))
    too_long = sc.grpc_request("tiny", *sc.generate_inputs(["x" * 40]))
    write_warmup(copy, [good, too_long])
    with pytest.raises(
        ExportError, match=r"Warmup request 2 \(generate\) fails .*max_sequence_length=32"
    ):
        replay_warmup(copy)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["primer", "feedback"])
def test_xla_saved_model_generates_the_same_text(family, tmp_path):
    """`--xla` compiles the decoding loop (fixed buffers, rows written in
    place, the prompt prefilled as Keras does): the same greedy text as Keras
    and as the portable SavedModel, seeded sampling that repeats, and a graph
    the portable rules refuse (it needs TF Serving's XLA)."""
    import tensorflow as tf
    from export_helpers import make_lm

    from keras_primer.export.saved_model import check_graph, export_saved_model

    lm = make_lm(family)
    plain = export_saved_model(lm, str(tmp_path / "plain"), "m", 1, default_max_new_tokens=4)
    xla = export_saved_model(lm, str(tmp_path / "xla"), "m", 1, default_max_new_tokens=4, xla=True)
    check_graph(xla, allow_xla=True)
    with pytest.raises(ValueError, match="_XlaMustCompile"):
        check_graph(xla)
    prompts = ["Hello", "Hi", "To be, or not"]
    outputs = {}
    for name, folder in (("plain", plain), ("xla", xla)):
        signature = tf.saved_model.load(folder).signatures["generate_with_options"]

        def run(temperature, seed, signature=signature):
            out = signature(
                prompts=tf.constant(prompts),
                max_new_tokens=tf.constant(NEW_TOKENS),
                temperature=tf.constant(temperature),
                top_k=tf.constant(0),
                top_p=tf.constant(1.0),
                seed=tf.constant(seed),
            )
            return [x.decode("utf-8") for x in out["outputs"].numpy()]

        outputs[name] = run(0.0, 0)
        sampled = run(1.0, 7)
        assert sampled == run(1.0, 7)
    assert outputs["xla"] == outputs["plain"] == keras_greedy(lm, prompts, NEW_TOKENS)
