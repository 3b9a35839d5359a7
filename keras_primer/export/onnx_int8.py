"""int8 copies of exported ONNX graphs (`keras-primer export --int8`), and
their agreement with float32.

The setting was chosen by measurement (docs/benchmarks.md, "int8";
`benchmarks/int8_tradeoff.py` tries the others): dynamic quantization,
weights int8 per output channel, every weight MatMul but the LM head.
Needs onnx and onnxruntime only (no TensorFlow).
"""

from __future__ import annotations

import os
import tempfile

import numpy as np

from keras_primer.export.onnx_graph import (
    IR_VERSION,
    drop_unused_initializers,
    set_graph_metadata,
)
from keras_primer_cli.errors import ExportError

# What `--int8` was measured to give (docs/benchmarks.md, "int8"); the export
# says it beside the model's size, since small models gain little.
MEASURED_TRADEOFF = (
    "--int8 measured (2-core CPU, batch 8): 1.45-1.51x fp32's speed with 99.35% of "
    "held-out next tokens unchanged for a 10.9M-parameter Primer EZ, about 1.1-1.3x and "
    "98.5% at 0.64M parameters (docs/benchmarks.md, int8)"
)
# The ops ORT's dynamic quantizer writes for a weight MatMul.
QUANTIZED_OPS = frozenset({"DynamicQuantizeMatMul", "MatMulInteger", "DynamicQuantizeLinear"})


def gemms_as_matmuls(src: str, dst: str) -> str:
    """Writes `src` to `dst` after ORT's basic graph optimizations (constant
    folding: each kernel becomes an initializer, the output projection's
    too, which tf2onnx keeps behind a `Reshape`), with every `Gemm` whose B
    is an initializer rewritten as `MatMul` (+ `Add` of C). ORT's dynamic
    quantizer has no `Gemm`: this is what lets it reach tf2onnx's fused QKV
    and output projections."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = dst
    ort.InferenceSession(src, options, providers=["CPUExecutionProvider"])
    model = onnx.load(dst)
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    kernels = {}  # Gemm B name -> the [K, N] kernel's initializer name
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
        if node.input[1] not in kernels:
            kernel = numpy_helper.to_array(initializers[node.input[1]])
            kernel = np.ascontiguousarray(kernel.T if attrs.get("transB", 0) else kernel)
            kernels[node.input[1]] = node.input[1] + "_kernel"
            graph.initializer.append(numpy_helper.from_array(kernel, kernels[node.input[1]]))
        name = node.name or node.output[0]
        bias = node.input[2] if len(node.input) > 2 and attrs.get("beta", 1.0) else ""
        product = node.output[0] + "_product" if bias else node.output[0]
        nodes.append(
            helper.make_node("MatMul", [node.input[0], kernels[node.input[1]]], [product], name)
        )
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name + "_bias"))
    del graph.node[:]
    graph.node.extend(nodes)
    drop_unused_initializers(graph)
    onnx.save(model, dst)
    return dst


def lm_head_matmuls(graph) -> list[str]:
    """The LM head's node name (the first MatMul up the data inputs from
    `logits`), or no name if there is none."""
    producers = {out: node for node in graph.node for out in node.output}
    tensor = "logits"
    while tensor in producers:
        node = producers[tensor]
        if node.op_type == "MatMul":
            return [node.name]
        tensor = node.input[0] if node.input else ""
    return []


def quantize_int8(src: str, dst: str, metadata: str) -> str:
    """Writes the int8 copy of the graph `src` to `dst`: every weight MatMul
    (`gemms_as_matmuls` first) but the LM head as ORT's
    `DynamicQuantizeMatMul`, weights int8 per output channel, activations
    quantized per tensor on the fly. The LM head stays float32: its int8
    errors flip near-tied next tokens for little speed. `metadata` is the
    export's graph metadata (`export_folder.graph_metadata`).

    Raises `ExportError` when nothing could be quantized: a Feedback model
    runs its layers inside an ONNX `Loop`, which the quantizer does not
    enter, and an "int8" file that computes in float32 would mislead.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="keras-primer-int8-") as scratch:
        folded = gemms_as_matmuls(src, os.path.join(scratch, "folded.onnx"))
        head = lm_head_matmuls(onnx.load(folded).graph)
        quantize_dynamic(
            folded,
            dst,
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul"],
            nodes_to_exclude=head,
        )
    proto = onnx.load(dst)
    if not any(node.op_type in QUANTIZED_OPS for node in proto.graph.node):
        os.remove(dst)
        raise ExportError(
            f"--int8: ONNX Runtime's quantizer found no weight MatMul to quantize in "
            f"{os.path.basename(src)} outside an ONNX Loop (a Feedback model runs its layers "
            "inside one), so its int8 copy would compute in float32: export without --int8."
        )
    proto.ir_version = max(IR_VERSION, min(proto.ir_version, 10))
    set_graph_metadata(proto, metadata)
    onnx.save(proto, dst)
    return dst


def int8_agreement(fp32_path: str, int8_path: str, token_ids, padding_mask=None) -> dict:
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
