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
  channel, `onnxruntime.quantization`: `onnx_int8.quantize_int8`).

The models use opset 17 and IR version 8, which onnxruntime 1.30 loads; each
layer norm is one `LayerNormalization` op (`onnx_graph.fuse_layer_norms`).
"""

import contextlib
import json
import os
import threading

import tensorflow as tf

from keras_primer.export.adapters import get_adapter
from keras_primer.export.onnx_graph import IR_VERSION, fuse_layer_norms, set_graph_metadata
from keras_primer.export.onnx_int8 import quantize_int8
from keras_primer.layers.cache_utils import export_safe_cache_writes, growing_cache_writes
from keras_primer_runtime import generation
from keras_primer_runtime.export_folder import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    file_fingerprint,
    graph_metadata,
)
from keras_primer_runtime.generation import empty_structure, structure_get

OPSET = 17
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
    set_graph_metadata(model_proto, metadata)
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
