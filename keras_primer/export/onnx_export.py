"""ONNX export through tf2onnx (TensorFlow backend only).

Writes, into one directory (the contract is documented in export/README.md):

* `model.onnx`: `input_ids` int32 `[batch, length]`, `attention_mask` int32
  `[batch, length]` -> `logits` float32 `[batch, length, vocab]`.
* `decoder_step.onnx`: `input_ids` int32 `[batch, n]` (n = 1 for a decoding
  step, n = prompt length for the prefill), `cache_position` int32 `[]`
  (position of `input_ids[:, 0]`, the same for every row), and the decoding
  state as named tensors (`state_tensors`, derived from the model's
  `decoding_state_specs()`, see `StateSpec.onnx_tensors`): `past_key_values.N.key` /
  `past_key_values.N.value` `[batch, max_length, heads, head_dim]` per
  layer (Primer) or per memory group (Feedback), and for Primer EZ the MDHA
  convolution state `conv_state.N` `[batch, 3, kernel_size - 1, heads,
  head_dim]` -> `logits` `[batch, vocab]` (of the last of the n tokens) and
  `present.N.key` / `present.N.value` / `present_conv_state.N`.
  `max_length` is a dynamic axis: the caller allocates the cache for
  prompt + new tokens.
* `export_config.json`: family, sizes, tokenizer description, state tensors.
* `tokenizer.json` (+ `tokenizer.model`, the SentencePiece proto).
* optionally `model.int8.onnx` and `decoder_step.int8.onnx` (dynamic int8
  quantization of the MatMul weights, per channel, `onnxruntime.quantization`).

The models use opset 17 and IR version 8, which onnxruntime 1.30 loads.
"""

import contextlib
import json
import os
import threading

import numpy as np
import tensorflow as tf

from keras_primer.export.adapters import get_adapter
from keras_primer.layers.cache_utils import export_safe_cache_writes
from keras_primer_runtime.ort_generator import CONFIG_FILE

OPSET = 17
IR_VERSION = 8
CATCH_ERRORS_VARIABLE = "TF2ONNX_CATCH_ERRORS"
# One conversion at a time in a process: tf2onnx builds in global graphs and
# name counters, and `_optimizers_in_place` sets a process-wide variable.
_CONVERSION_LOCK = threading.Lock()


def state_tensors(specs):
    """The ONNX tensors of the model-described states, in graph order.

    Derived from each `StateSpec`'s ONNX naming (`StateSpec.onnx_tensors`);
    each entry: `state`, `index` (the leading indices after the batch axis
    that select this tensor), `past`/`present` (ONNX names), `shape` (with
    `"batch"`/`"max_length"` symbols) and `dtype`.
    """
    return [tensor for spec in specs for tensor in spec.onnx_tensors()]


def _select(x, index):
    # Last axis first, so that dropping an axis does not move the earlier ones.
    for axis in reversed(range(len(index))):
        if index[axis] is not None:
            x = tf.gather(x, index[axis], axis=axis + 1)
    return x


def _split_state(name, value, tensors):
    return [_select(value, t["index"]) for t in tensors if t["state"] == name]


def _stack_state(spec, parts):
    """Inverse of the split: `parts` (in `onnx_tensors` order) stacked back
    along `spec.onnx_split`, innermost split axis first."""
    for j in reversed(range(len(spec.onnx_split))):
        size = spec.shape[spec.onnx_split[j]]
        # Axes a_0..a_{j-1} are still missing, so axis a_j sits j places earlier.
        parts = [
            tf.stack(parts[i : i + size], axis=spec.onnx_split[j] - j)
            for i in range(0, len(parts), size)
        ]
    (state,) = parts
    return state


@contextlib.contextmanager
def _optimizers_in_place():
    """tf2onnx deep-copies the whole graph before each of its optimizers, on
    each pass, to restore it if one fails: over half the conversion time of
    our models. `TF2ONNX_CATCH_ERRORS` turns the copies off (tf2onnx 1.17
    reads only whether the variable is set, so any value does)."""
    saved = os.environ.get(CATCH_ERRORS_VARIABLE)
    os.environ[CATCH_ERRORS_VARIABLE] = "false"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[CATCH_ERRORS_VARIABLE]
        else:
            os.environ[CATCH_ERRORS_VARIABLE] = saved


def _convert(function, input_signature, output_names, path):
    import onnx
    import tf2onnx

    def convert():
        return tf2onnx.convert.from_function(
            function, input_signature=input_signature, opset=OPSET, output_path=None
        )[0]

    with _CONVERSION_LOCK:
        try:
            with _optimizers_in_place():
                model_proto = convert()
        except Exception:  # an optimizer failed: again on tf2onnx's safe path, which skips it
            model_proto = convert()
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
    tensors = state_tensors(adapter.state_specs)

    # Both bodies enter `export_safe_cache_writes()`, so whoever traces them
    # (tf2onnx here) gets cache writes without `XlaDynamicUpdateSlice`.
    def logits_fn(input_ids, attention_mask):
        with export_safe_cache_writes():
            logits = adapter.logits(input_ids, attention_mask)
        return {"logits": tf.cast(logits, tf.float32)}

    logits_signature = [
        tf.TensorSpec([None, None], tf.int32, name="input_ids"),
        tf.TensorSpec([None, None], tf.int32, name="attention_mask"),
    ]

    def step_fn(input_ids, cache_position, *pasts):
        state = {}
        for spec in adapter.state_specs:
            parts = [p for p, t in zip(pasts, tensors) if t["state"] == spec.name]
            state[spec.name] = _stack_state(spec, parts)
        with export_safe_cache_writes():
            logits, next_state = adapter.step(input_ids, state, cache_position)
        outputs = [tf.cast(logits[:, -1], tf.float32)]
        for spec in adapter.state_specs:
            outputs += [
                tf.cast(x, tf.float32)
                for x in _split_state(spec.name, next_state[spec.name], tensors)
            ]
        return outputs

    step_signature = [
        tf.TensorSpec([None, None], tf.int32, name="input_ids"),
        tf.TensorSpec([], tf.int32, name="cache_position"),
    ] + [
        tf.TensorSpec(
            [d if isinstance(d, int) else None for d in t["shape"]], tf.float32, name=t["past"]
        )
        for t in tensors
    ]
    step_output_names = ["logits"] + [t["present"] for t in tensors]
    return (
        adapter,
        tensors,
        (tf.function(logits_fn, jit_compile=False, autograph=False), logits_signature, ["logits"]),
        (
            tf.function(step_fn, jit_compile=False, autograph=False),
            step_signature,
            step_output_names,
        ),
    )


def quantize_int8(src, dst):
    """Dynamic int8 quantization of the MatMul weights, per output channel
    (activations quantized on the fly by ORT's `DynamicQuantizeMatMul`)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        src, dst, weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"]
    )
    proto = onnx.load(dst)
    proto.ir_version = max(IR_VERSION, min(proto.ir_version, 10))
    onnx.save(proto, dst)
    return dst


def export_onnx(model, out_dir, int8=False):
    """Writes `model.onnx`, `decoder_step.onnx` (+ int8 copies), the config
    and the tokenizer files. Nothing is written for a model (or tokenizer)
    that cannot be exported.

    Returns a dict of the written paths.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError("ONNX export runs under the TensorFlow backend (tf2onnx).")
    adapter, tensors, logits_parts, step_parts = build_functions(model)
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "model": _convert(*logits_parts, os.path.join(out_dir, "model.onnx")),
        "decoder_step": _convert(*step_parts, os.path.join(out_dir, "decoder_step.onnx")),
    }
    if int8:
        paths["model_int8"] = quantize_int8(
            paths["model"], os.path.join(out_dir, "model.int8.onnx")
        )
        paths["decoder_step_int8"] = quantize_int8(
            paths["decoder_step"], os.path.join(out_dir, "decoder_step.int8.onnx")
        )
    config = dict(
        adapter.metadata(),
        opset=OPSET,
        ir_version=IR_VERSION,
        files={k: os.path.basename(v) for k, v in paths.items()},
        step_io={"input_ids": "input_ids", "cache_position": "cache_position", "logits": "logits"},
        state_tensors=tensors,
    )
    adapter.tokenizer.save(out_dir, adapter.proto)
    paths["tokenizer"] = os.path.join(out_dir, "tokenizer.json")
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
    feeds = {"input_ids": token_ids, "attention_mask": np.asarray(padding_mask, np.int32)}
    results = []
    for path in (fp32_path, int8_path):
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        results.append(session.run(["logits"], feeds)[0])
    mask = feeds["attention_mask"].astype(bool)
    agree = (results[0].argmax(-1) == results[1].argmax(-1))[mask]
    return {
        "next_token_agreement": float(agree.mean()),
        "max_abs_logit_diff": float(np.abs(results[0] - results[1]).max()),
        "positions": int(mask.sum()),
    }
