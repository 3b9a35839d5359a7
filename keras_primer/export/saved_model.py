"""SavedModel export for TensorFlow Serving (TensorFlow backend only).

`export_saved_model(model, base_dir, name, version)` writes

    base_dir/
      <name>/<version>/saved_model.pb     # signatures below, float32 weights
      <name>/<version>/variables/
      <name>/<version>/assets/tokenizer.model        (SentencePiece models)
      <name>/<version>/assets.extra/tf_serving_warmup_requests
      <name>/<version>/assets.extra/keras_primer.json (tokenizer, states)

Signatures (all traced with `jit_compile=False` and inside
`export_safe_cache_writes()`, so the decoding cache is written without
`XlaDynamicUpdateSlice`; the `generate` loops carry a past that grows by one
position per step, `growing_cache_writes()`, so a step costs what the
tokens so far need):

* `serving_default`: `token_ids` int32 `[batch, length]`, `padding_mask`
  int32 `[batch, length]` -> `logits` float32 `[batch, length, vocab]`.
* `generate`: `prompts` string `[batch]` -> `outputs` (prompt + completion,
  special tokens removed, as `CausalLM.generate` returns), `completions`
  (the new text only) and `num_new_tokens`, greedy,
  `default_max_new_tokens` new tokens at most.
* `generate_with_options`: `prompts`, `max_new_tokens` int32 `[]`,
  `temperature` float32 `[]` (0 = greedy), `top_k` int32 `[]` (0 = off),
  `top_p` float32 `[]` (1 = off), `seed` int32 `[]`; same outputs.

TF Serving requires every input of a signature in each request, so the
optional inputs live in a second signature instead of being optional.
The meaning of the options, their checks and error texts come from
`keras_primer_runtime.generation`; the next-token distribution from
`keras_primer.generation.filtered_probabilities`, as in Keras `generate`.
Tokenization happens in the graph: byte models with core ops (`bytes_split`,
`decode_raw`, a 256-entry byte table, `reduce_join`, `unicode_transcode`),
SentencePiece models with tensorflow-text's three SentencePiece ops
(`SENTENCEPIECE_OPS`; the op holds the proto as a node attribute, and a copy
is the SavedModel asset `assets/tokenizer.model`).
"""

import contextlib
import json
import os
import tempfile

import tensorflow as tf

from keras_primer.export.adapters import get_adapter
from keras_primer.export.generation_graph import GenerationGraph
from keras_primer.layers.cache_utils import export_safe_cache_writes
from keras_primer_runtime import generation

FORBIDDEN_OPS = ("PyFunc", "EagerPyFunc", "PyFuncStateless", "_XlaCompile", "_XlaRun", "XlaLaunch")
#: The only non-core ops a SavedModel may hold (SentencePiece models only).
SENTENCEPIECE_OPS = ("SentencepieceOp", "SentencepieceTokenizeOp", "SentencepieceDetokenizeOp")
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
METADATA_FILE = os.path.join("assets.extra", "keras_primer.json")


def build_module(model, default_max_new_tokens=32, xla=False):
    """A `tf.Module` holding the model variables and the three signatures
    (the `generate` loops XLA-compiled with `xla`, see `export_saved_model`)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(
            "SavedModel export runs under the TensorFlow backend. Use "
            "`keras_primer.export.export_model(...)` or `keras-primer export`, "
            "which start a KERAS_BACKEND=tensorflow subprocess when needed."
        )
    adapter = get_adapter(model)
    module = tf.Module()
    sentencepiece = None
    if adapter.tokenizer.kind == "sentencepiece":
        import tensorflow_text

        sentencepiece = tensorflow_text.SentencepieceTokenizer(
            model=adapter.proto, out_type=tf.int32
        )
        module.sentencepiece = sentencepiece  # tracks the op's resource
    graph = GenerationGraph(adapter, default_max_new_tokens, sentencepiece, xla=xla)
    # Cache writes without `XlaDynamicUpdateSlice` in what TF Serving runs as
    # a plain graph; an XLA loop writes its rows in place.
    decode_writes = contextlib.nullcontext if xla else export_safe_cache_writes

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None], tf.int32, name="token_ids"),
            tf.TensorSpec([None, None], tf.int32, name="padding_mask"),
        ],
        jit_compile=False,
        autograph=False,
    )
    def serving_default(token_ids, padding_mask):
        # Each body traces inside `export_safe_cache_writes()`: cache rows are
        # written with core ops, not `XlaDynamicUpdateSlice` (see cache_utils).
        with export_safe_cache_writes():
            return graph.logits(token_ids, padding_mask)

    @tf.function(
        input_signature=[tf.TensorSpec([None], tf.string, name="prompts")],
        jit_compile=False,
        autograph=False,
    )
    def generate(prompts):
        with decode_writes():
            return graph.generate(prompts, tf.constant(graph.default_max_new_tokens))

    @tf.function(
        input_signature=[
            tf.TensorSpec([None], tf.string, name="prompts"),
            tf.TensorSpec([], tf.int32, name="max_new_tokens"),
            tf.TensorSpec([], tf.float32, name="temperature"),
            tf.TensorSpec([], tf.int32, name="top_k"),
            tf.TensorSpec([], tf.float32, name="top_p"),
            tf.TensorSpec([], tf.int32, name="seed"),
        ],
        jit_compile=False,
        autograph=False,
    )
    def generate_with_options(prompts, max_new_tokens, temperature, top_k, top_p, seed):
        with decode_writes():
            return graph.generate(prompts, max_new_tokens, (temperature, top_k, top_p, seed))

    signatures = {
        "serving_default": serving_default.get_concrete_function(),
        "generate": generate.get_concrete_function(),
        "generate_with_options": generate_with_options.get_concrete_function(),
    }
    # Also the module's attributes (callable after `tf.saved_model.load`), as
    # the traced concrete functions: `tf.saved_model.save` would trace a
    # `tf.function` attribute's body again under its own context (a third of
    # the export's time: the `generate` loops twice more).
    for name, function in signatures.items():
        setattr(module, name, function)
    # Track the tf.Variables the traced functions capture (as Keras'
    # ExportArchive does), not the Keras variable wrappers: the TF1-style
    # loader of TF Serving and `saved_model_cli run` restores exactly these.
    captured = {}
    for function in signatures.values():
        for variable in function.variables:
            captured[id(variable)] = variable
    module.model_variables = list(captured.values())
    return module, signatures, adapter


def warmup_requests(model_name, adapter, default_max_new_tokens):
    """`PredictRequest`s that exercise each signature once (small inputs)."""
    from keras_primer_runtime import serving_client as sc

    spec = adapter.tokenizer
    # Prompts short enough for `generate`'s default: a model of a small context
    # keeps `max_length - start - default_max_new_tokens` tokens for them.
    room = adapter.max_sequence_length - int(spec.add_start_token) - default_max_new_tokens
    prompts = [p[: max(1, room)] for p in ("Hi", "The")]
    token_ids = [
        [spec.start_id, 72 % spec.vocabulary_size, 105 % spec.vocabulary_size],
        [spec.start_id, 33 % spec.vocabulary_size, spec.pad_id],
    ]
    requests = [
        sc.grpc_request(model_name, *sc.logits_inputs(token_ids, [[1, 1, 1], [1, 1, 0]])),
        sc.grpc_request(model_name, *sc.generate_inputs(prompts)),
        sc.grpc_request(
            model_name,
            *sc.generate_inputs(
                prompts[:1],
                max_new_tokens=max(1, min(4, default_max_new_tokens)),
                temperature=0.8,
                top_k=5,
                top_p=0.9,
                seed=1,
            ),
        ),
    ]
    return requests


def write_warmup(version_dir, requests):
    from tensorflow_serving.apis import prediction_log_pb2

    path = os.path.join(version_dir, WARMUP_FILE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tf.io.TFRecordWriter(path) as writer:
        for req in requests:
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=req)
            )
            writer.write(log.SerializeToString())
    return path


# Graph-plumbing ops of TensorFlow core without a `tf.raw_ops` wrapper.
_CORE_WITHOUT_RAW_OPS = ("_Arg", "_Retval", "_If", "_While", "NoOp")


def check_graph(saved_model_dir, allow_sentencepiece=False, allow_xla=False):
    """Walks every node of every function of a SavedModel.

    Returns the sorted list of op types. Raises ValueError on a forbidden op
    (`PyFunc`, `EagerPyFunc`, `Xla*`, `_XlaCompile`/`_XlaRun`), on a function
    or node marked for XLA compilation, or on an op outside TensorFlow core,
    except exactly `SENTENCEPIECE_OPS` when `allow_sentencepiece`, and
    functions marked for XLA with their `Xla*` ops when `allow_xla` (an
    `--xla` export).
    """
    from tensorflow.core.protobuf import saved_model_pb2
    from tensorflow.python.framework import op_def_registry

    allowed_text_ops = set(SENTENCEPIECE_OPS) if allow_sentencepiece else set()
    if allowed_text_ops:
        import tensorflow_text  # noqa: F401  registers its ops

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(saved_model_dir, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    op_types, problems = set(), []
    for meta_graph in proto.meta_graphs:
        graph_def = meta_graph.graph_def
        functions = {f.signature.name for f in graph_def.library.function}
        node_lists = [("<graph>", graph_def.node)]
        for function in graph_def.library.function:
            marked = "_XlaMustCompile" in function.attr and function.attr["_XlaMustCompile"].b
            if marked and not allow_xla:
                problems.append(f"function {function.signature.name} has _XlaMustCompile=True")
            node_lists.append((function.signature.name, function.node_def))
        for owner, nodes in node_lists:
            for node in nodes:
                op = node.op
                if op in functions:
                    continue
                op_types.add(op)
                if op in FORBIDDEN_OPS or (op.startswith("Xla") and not allow_xla):
                    problems.append(f"{owner}: node {node.name} uses forbidden op {op}")
                elif op in allowed_text_ops or op.startswith("Xla"):
                    pass
                elif op_def_registry.get(op) is None:
                    problems.append(f"{owner}: node {node.name} uses unregistered op {op}")
                elif not hasattr(tf.raw_ops, op) and op not in _CORE_WITHOUT_RAW_OPS:
                    # Registered, but by a library (tensorflow-text, ...), not TF core.
                    problems.append(f"{owner}: node {node.name} uses non-core op {op}")
                marked = "_XlaMustCompile" in node.attr and node.attr["_XlaMustCompile"].b
                if marked and not allow_xla:
                    problems.append(f"{owner}: node {node.name} has _XlaMustCompile=True")
    if problems:
        raise ValueError(
            "SavedModel graph breaks the serving rules:\n" + "\n".join(sorted(set(problems))[:50])
        )
    return sorted(op_types)


def replay_warmup(version_dir):
    """Replays every warmup request against the SavedModel in `version_dir`.

    TF Serving started with `--enable_model_warmup=true` refuses to load a
    model whose warmup request fails, so an export whose record fails is
    refused here (`ExportError`, naming the record and the fix).
    """
    from tensorflow_serving.apis import prediction_log_pb2

    from keras_primer_cli.errors import ExportError

    loaded = tf.saved_model.load(version_dir)
    path = os.path.join(version_dir, WARMUP_FILE)
    for number, record in enumerate(tf.data.TFRecordDataset(path), 1):
        request = prediction_log_pb2.PredictionLog.FromString(record.numpy()).predict_log.request
        signature = request.model_spec.signature_name
        inputs = {k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()}
        try:
            loaded.signatures[signature](**inputs)
        except (tf.errors.OpError, KeyError, TypeError, ValueError) as error:
            message = " ".join(str(getattr(error, "message", error)).split())[:300]
            raise ExportError(
                f"Warmup request {number} ({signature}) fails on the written SavedModel, so TF "
                f"Serving would refuse to load it: {message} Lower --max-new-tokens."
            ) from None


def export_saved_model(
    model, base_dir, model_name="primer", version=1, default_max_new_tokens=32, xla=False
):
    """Writes `base_dir/<model_name>/<version>/` for `model`; returns that folder.

    Nothing is written when the model (or its tokenizer) cannot be exported.
    `models.config` is not written here: `keras-primer export` merges it
    into `--out` (through its protobuf) under the folder's lock.

    Args:
        model: A float32 causal LM of a known family, with a known tokenizer.
        base_dir: Directory that receives `<model_name>/<version>/`.
        model_name: TF Serving model name.
        version: Integer version directory.
        default_max_new_tokens: New tokens of the `generate` signature.
        xla: Compile the `generate` loops with XLA (as Keras `generate`
            does): faster on a CPU, but TF Serving then needs
            `--xla_cpu_compilation_enabled=true`, and each new batch and
            length is compiled once. False: plain ops any TF Serving runs.
    """
    if int(version) < 1:
        raise ValueError(f"`version` must be a positive integer. Received: {version}")
    version_dir = os.path.join(base_dir, model_name, str(int(version)))
    module, signatures, adapter = build_module(model, default_max_new_tokens, xla=xla)
    with tempfile.TemporaryDirectory() as scratch:
        if adapter.proto is not None:
            # A copy of the proto as a SavedModel asset (assets/tokenizer.model).
            proto_path = os.path.join(scratch, generation.SENTENCEPIECE_FILE)
            with open(proto_path, "wb") as f:
                f.write(adapter.proto)
            module.tokenizer_model = tf.saved_model.Asset(proto_path)
        tf.saved_model.save(
            module,
            version_dir,
            signatures=signatures,
            options=tf.saved_model.SaveOptions(experimental_custom_gradients=False),
        )
    write_warmup(version_dir, warmup_requests(model_name, adapter, default_max_new_tokens))
    meta = dict(
        adapter.metadata(),
        default_max_new_tokens=int(default_max_new_tokens),
        xla=bool(xla),
        model_name=model_name,
        version=int(version),
    )
    with open(os.path.join(version_dir, METADATA_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    check_graph(version_dir, allow_sentencepiece=adapter.proto is not None, allow_xla=xla)
    return version_dir
