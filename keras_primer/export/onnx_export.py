"""ONNX export through tf2onnx (TensorFlow backend only).

Writes, into one directory:

* `model.onnx`: `token_ids` int32 `[batch, length]` (+ `padding_mask` int32
  `[batch, length]`) -> `logits` float32 `[batch, length, vocab]`.
* `decoder_step.onnx`: `token_ids` int32 `[batch, n]` (n = 1 for a decoding
  step, n = prompt length for the prefill), `position` int32 `[]` (position
  of `token_ids[:, 0]`), one `past_<state>` input per decoding state (Primer:
  `past_key_value` `[batch, layers, 2, max_length, heads, head_dim]` and
  `past_conv` `[batch, layers, 3, kernel_size - 1, heads, head_dim]`)
  -> `logits` `[batch, vocab]` (of the last of the n tokens) and one
  `present_<state>` output per state. `max_length` is a dynamic axis: the
  caller allocates the cache for prompt + new tokens.
* `export_config.json`: the adapter metadata the ONNX Runtime generator reads.
* optionally `model.int8.onnx` and `decoder_step.int8.onnx` (dynamic int8
  quantization of the weights with `onnxruntime.quantization`).

The models use opset 17 and IR version 8, which onnxruntime 1.30 loads.
"""

import json
import os

import numpy as np
import tensorflow as tf

from keras_primer.export.adapters import get_adapter

OPSET = 17
IR_VERSION = 8
CONFIG_FILE = "export_config.json"


def _convert(function, input_signature, output_names, path):
    import onnx
    import tf2onnx

    model_proto, _ = tf2onnx.convert.from_function(
        function, input_signature=input_signature, opset=OPSET, output_path=None
    )
    # tf2onnx names graph outputs after TF tensors; rename them for clients.
    graph = model_proto.graph
    renames = {}
    for output, name in zip(graph.output, output_names):
        renames[output.name] = name
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out in renames:
                node.output[i] = renames[out]
        for i, inp in enumerate(node.input):
            if inp in renames:
                node.input[i] = renames[inp]
    for output in graph.output:
        output.name = renames.get(output.name, output.name)
    model_proto.ir_version = IR_VERSION
    onnx.checker.check_model(model_proto)
    onnx.save(model_proto, path)
    return path


def build_functions(model):
    """The TF functions converted to ONNX: full logits and one decoder step."""
    adapter = get_adapter(model)

    def logits_fn(token_ids, padding_mask):
        return {"logits": tf.cast(adapter.logits(token_ids, padding_mask), tf.float32)}

    logits_signature = [
        tf.TensorSpec([None, None], tf.int32, name="token_ids"),
        tf.TensorSpec([None, None], tf.int32, name="padding_mask"),
    ]
    specs = adapter.state_specs(None)
    names = list(adapter.state_names)

    def step_fn(token_ids, position, *states):
        state = dict(zip(names, states))
        logits, next_state = adapter.step(token_ids, state, position)
        outputs = [tf.cast(logits[:, -1], tf.float32)]
        outputs += [tf.cast(next_state[n], tf.float32) for n in names]
        return outputs

    step_signature = [
        tf.TensorSpec([None, None], tf.int32, name="token_ids"),
        tf.TensorSpec([], tf.int32, name="position"),
    ] + [tf.TensorSpec(specs[n][0], tf.float32, name=f"past_{n}") for n in names]
    step_output_names = ["logits"] + [f"present_{n}" for n in names]
    return (
        adapter,
        (tf.function(logits_fn, jit_compile=False, autograph=False), logits_signature, ["logits"]),
        (tf.function(step_fn, jit_compile=False, autograph=False), step_signature, step_output_names),
    )


def quantize_int8(src, dst):
    """Dynamic int8 quantization of the weights (MatMul/Gather...)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    proto = onnx.load(dst)
    proto.ir_version = max(IR_VERSION, min(proto.ir_version, 10))
    onnx.save(proto, dst)
    return dst


def export_onnx(model, out_dir, int8=False):
    """Writes `model.onnx`, `decoder_step.onnx` (+ int8 copies) and the config.

    Returns a dict of the written paths.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("ONNX export runs under the TensorFlow backend (tf2onnx).")
    os.makedirs(out_dir, exist_ok=True)
    adapter, logits_parts, step_parts = build_functions(model)
    paths = {
        "model": _convert(*logits_parts, os.path.join(out_dir, "model.onnx")),
        "decoder_step": _convert(*step_parts, os.path.join(out_dir, "decoder_step.onnx")),
    }
    if int8:
        paths["model_int8"] = quantize_int8(paths["model"], os.path.join(out_dir, "model.int8.onnx"))
        paths["decoder_step_int8"] = quantize_int8(
            paths["decoder_step"], os.path.join(out_dir, "decoder_step.int8.onnx")
        )
    config = dict(
        adapter.metadata(),
        opset=OPSET,
        ir_version=IR_VERSION,
        files={k: os.path.basename(v) for k, v in paths.items()},
        step_inputs=["token_ids", "position"] + [f"past_{n}" for n in adapter.state_names],
        step_outputs=["logits"] + [f"present_{n}" for n in adapter.state_names],
    )
    paths["config"] = os.path.join(out_dir, CONFIG_FILE)
    with open(paths["config"], "w") as f:
        json.dump(config, f, indent=2)
    return paths


def int8_agreement(fp32_path, int8_path, token_ids, padding_mask=None):
    """Next-token (argmax) agreement and max |logit| change of int8 vs fp32."""
    import onnxruntime as ort

    token_ids = np.asarray(token_ids, np.int32)
    if padding_mask is None:
        padding_mask = np.ones_like(token_ids)
    feeds = {"token_ids": token_ids, "padding_mask": np.asarray(padding_mask, np.int32)}
    results = []
    for path in (fp32_path, int8_path):
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        results.append(session.run(["logits"], feeds)[0])
    mask = feeds["padding_mask"].astype(bool)
    agree = (results[0].argmax(-1) == results[1].argmax(-1))[mask]
    return {
        "next_token_agreement": float(agree.mean()),
        "max_abs_logit_diff": float(np.abs(results[0] - results[1]).max()),
        "positions": int(mask.sum()),
    }
