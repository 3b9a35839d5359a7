"""ONNX export through tf2onnx (TensorFlow backend only).

Writes, into one directory (the contract is documented in export/README.md):

* `model.onnx`: `input_ids` int32 `[batch, length]`, `attention_mask` int32
  `[batch, length]` -> `logits` float32 `[batch, length, vocab]`.
* `decoder_step.onnx`: `input_ids` int32 `[batch, n]` (n = 1 for a decoding
  step, n = prompt length for the prefill), `cache_position` int32 `[]`
  (position of `input_ids[:, 0]`, the same for every row), and the decoding
  state as named tensors (`states` of the config, derived from the model's
  `decoding_state_specs()`, one input per `StateSpec`): `past_key_values.N.key` /
  `past_key_values.N.value` `[batch, heads, length, head_dim]` per layer
  (Primer, Optimum's names and layout; Feedback: `past_key_values.memory.*`
  `[batch, length, kv_groups, heads, head_dim]`), and the depthwise
  convolutions' states (`conv_state.N` `[batch, 3, kernel_size - 1, heads,
  head_dim]`; Feedback's `query_conv`, `key_conv`, `value_conv`) ->
  `logits` `[batch, vocab]` (of the last of the n tokens) and
  `present.N.key` / `present.N.value` / `present_conv_state.N` ....
  The past grows as Optimum's decoder-with-past does: its `length` equals
  `cache_position` (the positions before the step; 0 for the prefill), and
  each present is the past with the step's n rows appended
  (`keras_primer.layers.cache_utils.growing_cache_writes`), so a step costs
  what the tokens so far need.
* `export_config.json`: family, sizes, tokenizer description, state tensors,
  and the SHA-256 of every file (`keras_primer_runtime.export_folder`); the
  sizes are stored in each graph's metadata too.
* `tokenizer.json` (+ `tokenizer.model`, the SentencePiece proto).
* optionally `model.int8.onnx` and `decoder_step.int8.onnx` (dynamic int8
  quantization of every weight MatMul but the LM head, weights per output
  channel, `onnxruntime.quantization`: `quantize_int8`).

The models use opset 17 and IR version 8, which onnxruntime 1.30 loads; each
layer norm is one `LayerNormalization` op (`onnx_graph.fuse_layer_norms`).
"""

import contextlib
import json
import os
import threading

import numpy as np
import tensorflow as tf

from keras_primer.export.adapters import get_adapter
from keras_primer.export.onnx_graph import fuse_layer_norms
from keras_primer.layers.cache_utils import export_safe_cache_writes, growing_cache_writes
from keras_primer_runtime import generation
from keras_primer_runtime.export_folder import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    METADATA_KEY,
    file_fingerprint,
    graph_metadata,
)
from keras_primer_runtime.generation import empty_structure, structure_get

OPSET = 17
IR_VERSION = 8
CATCH_ERRORS_VARIABLE = "TF2ONNX_CATCH_ERRORS"
# One conversion at a time in a process: tf2onnx builds in global graphs and
# name counters, and `_optimizers_in_place` sets a process-wide variable.
_CONVERSION_LOCK = threading.Lock()


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


def _set_metadata(model_proto, metadata: str) -> None:
    """Stores the export's sizes in the graph (`export_folder.METADATA_KEY`)."""
    entries = {p.key: p.value for p in model_proto.metadata_props}
    entries[METADATA_KEY] = metadata
    del model_proto.metadata_props[:]
    for key, value in entries.items():
        model_proto.metadata_props.add(key=key, value=value)


def _convert(function, input_signature, output_names, path, metadata):
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
    fuse_layer_norms(model_proto)
    _set_metadata(model_proto, metadata)
    onnx.checker.check_model(model_proto)
    onnx.save(model_proto, path)
    return path


def build_functions(model):
    """The TF functions converted to ONNX: full logits and one decoder step."""
    adapter = get_adapter(model)
    specs = adapter.state_specs

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
        # The model's cache structure, each tensor an input: nothing is
        # stacked or split around the step.
        by_spec = dict(zip(specs, pasts))
        state = empty_structure(specs, by_spec.__getitem__)
        with export_safe_cache_writes(), growing_cache_writes():
            logits, next_state = adapter.step(input_ids, state, cache_position)
        outputs = [tf.cast(logits[:, -1], tf.float32)]
        outputs += [tf.cast(structure_get(next_state, spec.path), tf.float32) for spec in specs]
        return outputs

    step_signature = [
        tf.TensorSpec([None, None], tf.int32, name="input_ids"),
        tf.TensorSpec([], tf.int32, name="cache_position"),
    ] + [
        tf.TensorSpec(
            [d if isinstance(d, int) else None for d in spec.shape], tf.float32, name=spec.onnx_name
        )
        for spec in specs
    ]
    step_output_names = ["logits"] + [spec.present_name for spec in specs]
    return (
        adapter,
        (tf.function(logits_fn, jit_compile=False, autograph=False), logits_signature, ["logits"]),
        (
            tf.function(step_fn, jit_compile=False, autograph=False),
            step_signature,
            step_output_names,
        ),
    )


def quantize_int8(src, dst, metadata):
    """Dynamic int8 quantization of every weight MatMul but the LM head:
    weights int8 per output channel, activations quantized per tensor on the
    fly (ORT's `DynamicQuantizeMatMul`).

    Chosen by measurement (docs/benchmarks.md, "int8";
    `benchmarks/int8_tradeoff.py`). tf2onnx writes the fused QKV and output
    projections as `Gemm` (the output projection's kernel behind a
    `Reshape`), which ORT's dynamic quantizer does not handle, so the graph
    first goes through ORT's basic optimizations (constant folding: every
    kernel becomes an initializer) and each `Gemm` with a constant B becomes
    `MatMul` (+ `Add`); quantizing those too is what makes a decoding step
    faster. The LM head (the MatMul the `logits` output comes from) stays
    float32: its int8 errors flip near-tied next tokens for little speed.
    """
    import tempfile

    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="keras-primer-int8-") as scratch:
        folded = os.path.join(scratch, "folded.onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = folded
        ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
        model = onnx.load(folded)
        graph = model.graph
        initializers = {i.name: i for i in graph.initializer}
        transposed = {}  # Gemm B name -> the [K, N] kernel's initializer name
        nodes = []
        for node in graph.node:
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if (
                node.op_type != "Gemm"
                or node.input[1] not in initializers
                or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0
                or attrs.get("beta", 1.0) not in (0.0, 1.0)
            ):
                nodes.append(node)
                continue
            if node.input[1] not in transposed:
                kernel = numpy_helper.to_array(initializers[node.input[1]])
                kernel = np.ascontiguousarray(kernel.T if attrs.get("transB", 0) else kernel)
                transposed[node.input[1]] = node.input[1] + "_kernel"
                graph.initializer.append(numpy_helper.from_array(kernel, transposed[node.input[1]]))
            name = node.name or node.output[0]
            bias = node.input[2] if len(node.input) > 2 and attrs.get("beta", 1.0) else ""
            product = node.output[0] + "_product" if bias else node.output[0]
            nodes.append(
                helper.make_node(
                    "MatMul", [node.input[0], transposed[node.input[1]]], [product], name
                )
            )
            if bias:
                nodes.append(
                    helper.make_node("Add", [product, bias], [node.output[0]], name + "_bias")
                )
        del graph.node[:]
        graph.node.extend(nodes)
        used = {i for n in graph.node for i in n.input}
        kept = [i for i in graph.initializer if i.name in used]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        # The LM head: the first MatMul up the data inputs from `logits`.
        producers = {out: n for n in graph.node for out in n.output}
        head, tensor = [], "logits"
        while tensor in producers and not head:
            node = producers[tensor]
            head = [node.name] if node.op_type == "MatMul" else []
            tensor = node.input[0] if node.input else ""
        onnx.save(model, folded)
        quantize_dynamic(
            folded,
            dst,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=head,
        )
    proto = onnx.load(dst)
    proto.ir_version = max(IR_VERSION, min(proto.ir_version, 10))
    _set_metadata(proto, metadata)
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
    adapter, logits_parts, step_parts = build_functions(model)
    os.makedirs(out_dir, exist_ok=True)
    config = dict(
        adapter.metadata(),
        format=EXPORT_FORMAT,
        opset=OPSET,
        ir_version=IR_VERSION,
        step_io={"input_ids": "input_ids", "cache_position": "cache_position", "logits": "logits"},
    )
    metadata = graph_metadata(config)
    paths = {
        "model": _convert(*logits_parts, os.path.join(out_dir, "model.onnx"), metadata),
        "decoder_step": _convert(*step_parts, os.path.join(out_dir, "decoder_step.onnx"), metadata),
    }
    if int8:
        for name in ("model", "decoder_step"):
            paths[f"{name}_int8"] = quantize_int8(
                paths[name], os.path.join(out_dir, f"{name}.int8.onnx"), metadata
            )
    config["files"] = {k: os.path.basename(v) for k, v in paths.items()}
    tokenizer_files = adapter.tokenizer.save(out_dir, adapter.proto)
    paths["tokenizer"] = os.path.join(out_dir, generation.TOKENIZER_FILE)
    # Every file the config describes, fingerprinted: a runtime refuses a
    # folder whose files were swapped or edited (`export_folder.read_export`).
    config["fingerprints"] = {
        os.path.basename(path): file_fingerprint(path)
        for path in [*paths.values(), *tokenizer_files]
    }
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
