"""Rewrites of converted ONNX graphs that ONNX Runtime cannot do itself.

tf2onnx spells Keras' `LayerNormalization` as the 13 ops of
`tf.nn.moments` + `tf.nn.batch_normalization` (the means as
`GlobalAveragePool`), which ONNX Runtime's own layer-norm fusion does not
recognise. In a decoding step of a small model, where each op costs about
as much as its arithmetic, those ops are a large part of the time:
`fuse_layer_norms` replaces each one by ONNX's `LayerNormalization` (opset
17), a single kernel. The rewrite checks every node it removes and leaves a
subgraph that differs in any way untouched; the export's parity tests
compare the rewritten graphs with Keras.
"""

from __future__ import annotations

import numpy as np

from keras_primer_runtime.export_folder import METADATA_KEY

# The IR version of every graph written (onnxruntime 1.30 loads it).
IR_VERSION = 8


def set_graph_metadata(model_proto, metadata: str) -> None:
    """Stores the export's sizes in the graph (`export_folder.METADATA_KEY`),
    which the runtime checks against the folder's config."""
    entries = {p.key: p.value for p in model_proto.metadata_props}
    entries[METADATA_KEY] = metadata
    del model_proto.metadata_props[:]
    for key, value in entries.items():
        model_proto.metadata_props.add(key=key, value=value)


def _single_consumer(consumers, name, op_type):
    nodes = consumers.get(name, [])
    if len(nodes) == 1 and nodes[0].op_type == op_type:
        return nodes[0]
    return None


def _other_input(node, known):
    """The input of a two-input node that is not `known` (None if absent)."""
    inputs = list(node.input)
    if len(inputs) != 2 or known not in inputs:
        return None
    return inputs[1] if inputs[0] == known else inputs[0]


def _match(x, mean, consumers, initializers):
    """The nodes of one layer norm of `x` starting at `mean` (a
    `GlobalAveragePool` of `x`), with `(epsilon, gamma, beta, output)`; None
    when the subgraph is anything else."""
    users = consumers.get(mean.output[0], [])
    sub = next(
        (n for n in users if n.op_type == "Sub" and list(n.input) == [x, mean.output[0]]), None
    )
    neg = next((n for n in users if n.op_type == "Neg"), None)
    if len(users) != 2 or sub is None or neg is None:
        return None
    square = _single_consumer(consumers, sub.output[0], "Mul")
    if square is None or list(square.input) != [sub.output[0]] * 2:
        return None
    variance = _single_consumer(consumers, square.output[0], "GlobalAveragePool")
    add_eps = variance and _single_consumer(consumers, variance.output[0], "Add")
    epsilon = add_eps and _other_input(add_eps, variance.output[0])
    sqrt = add_eps and _single_consumer(consumers, add_eps.output[0], "Sqrt")
    reciprocal = sqrt and _single_consumer(consumers, sqrt.output[0], "Reciprocal")
    scale = reciprocal and _single_consumer(consumers, reciprocal.output[0], "Mul")
    gamma = scale and _other_input(scale, reciprocal.output[0])
    if not (epsilon in initializers and gamma in initializers):
        return None
    scaled = consumers.get(scale.output[0], [])
    x_scaled = next((n for n in scaled if _other_input(n, scale.output[0]) == x), None)
    mean_scaled = next(
        (n for n in scaled if _other_input(n, scale.output[0]) == neg.output[0]), None
    )
    if len(scaled) != 2 or x_scaled is None or mean_scaled is None or x_scaled is mean_scaled:
        return None
    shift = _single_consumer(consumers, mean_scaled.output[0], "Add")
    beta = shift and _other_input(shift, mean_scaled.output[0])
    out = shift and _single_consumer(consumers, shift.output[0], "Add")
    if beta not in initializers or out is None:
        return None
    if _other_input(out, shift.output[0]) != x_scaled.output[0]:
        return None
    if (
        len(consumers.get(x_scaled.output[0], [])) != 1
        or len(consumers.get(neg.output[0], [])) != 1
    ):
        return None
    removed = [mean, sub, neg, square, variance, add_eps, sqrt, reciprocal, scale]
    removed += [x_scaled, mean_scaled, shift, out]
    return removed, epsilon, gamma, beta, out.output[0]


def fuse_layer_norms(model) -> int:
    """Replaces each moments-based layer norm of `model` (an `onnx.ModelProto`,
    opset >= 17) by one `LayerNormalization` over the last axis; returns how
    many it replaced."""
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    consumers: dict = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):  # a node reading a name twice counts once
            consumers.setdefault(name, []).append(node)
    fused = 0
    for node in list(graph.node):
        if node.op_type != "GlobalAveragePool" or node not in graph.node:
            continue
        match = _match(node.input[0], node, consumers, initializers)
        if match is None:
            continue
        removed, epsilon, gamma, beta, output = match
        eps = float(numpy_helper.to_array(initializers[epsilon]).reshape(-1)[0])
        weights = []
        for name in (gamma, beta):
            flat = numpy_helper.to_array(initializers[name]).reshape(-1).astype(np.float32)
            weights.append(f"{name}__layer_norm_flat")
            graph.initializer.append(numpy_helper.from_array(flat, weights[-1]))
        index = min(list(graph.node).index(n) for n in removed)
        for n in removed:
            graph.node.remove(n)
        graph.node.insert(
            index,
            helper.make_node(
                "LayerNormalization",
                [node.input[0], *weights],
                [output],
                name=f"{node.name}__layer_norm",
                axis=-1,
                epsilon=eps,
            ),
        )
        fused += 1
    if fused:  # drop the initializers only the removed nodes read
        drop_unused_initializers(graph)
    return fused


def drop_unused_initializers(graph) -> None:
    """Removes the initializers that nothing in `graph` reads (after a rewrite
    replaced the nodes that did); names read inside subgraphs count."""
    used = _names_read(graph)
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _names_read(graph) -> set:
    """Every name the nodes of `graph` read, inside subgraphs (a `Loop`'s
    body reads the outer graph's initializers) included."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            for sub in [attribute.g, *attribute.graphs]:
                if sub is not None and sub.node:
                    names |= _names_read(sub)
    return names
