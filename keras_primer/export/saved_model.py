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
import tensorflow.experimental.numpy as tnp

from keras_primer.export.adapters import get_adapter
from keras_primer.generation import filtered_probabilities
from keras_primer.layers.cache_utils import export_safe_cache_writes, growing_cache_writes
from keras_primer_runtime import generation

FORBIDDEN_OPS = ("PyFunc", "EagerPyFunc", "PyFuncStateless", "_XlaCompile", "_XlaRun", "XlaLaunch")
#: The only non-core ops a SavedModel may hold (SentencePiece models only).
SENTENCEPIECE_OPS = ("SentencepieceOp", "SentencepieceTokenizeOp", "SentencepieceDetokenizeOp")
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
METADATA_FILE = os.path.join("assets.extra", "keras_primer.json")


def _byte_table():
    return tf.constant([bytes([i]) for i in range(256)])


def _valid_utf8(text):
    return tf.strings.unicode_transcode(
        text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
    )


def _assert(condition, message):
    return tf.debugging.Assert(condition, [message])


class GenerationGraph:
    """The TensorFlow functions behind the signatures, for one adapter.

    `sentencepiece` is a `tensorflow_text.SentencepieceTokenizer` for
    SentencePiece models (None for byte models).
    """

    def __init__(self, adapter, default_max_new_tokens=32, sentencepiece=None, xla=False):
        self.adapter = adapter
        self.spec = adapter.tokenizer
        self.sentencepiece = sentencepiece
        self.xla = bool(xla)
        # With `xla`, the numeric loop is one XLA computation (the strings
        # around it cannot be compiled).
        self.decode = (
            tf.function(self._decode, jit_compile=True, autograph=False) if xla else self._decode
        )
        limit = adapter.max_sequence_length - (2 if self.spec.add_start_token else 1)
        if (
            isinstance(default_max_new_tokens, bool)
            or not 1 <= int(default_max_new_tokens) <= limit
        ):
            raise ValueError(
                f"`default_max_new_tokens` must be between 1 and {limit} for a model "
                f"with max_sequence_length={adapter.max_sequence_length}. "
                f"Received: {default_max_new_tokens}"
            )
        self.default_max_new_tokens = int(default_max_new_tokens)

    # === serving_default ===
    def logits(self, token_ids, padding_mask):
        a = self.adapter
        shape = tf.shape(token_ids)
        checks = [
            tf.debugging.assert_equal(
                tf.shape(padding_mask),
                shape,
                message="`padding_mask` must have the shape of `token_ids` [batch, length].",
            ),
            tf.debugging.assert_positive(
                shape[1], message="`token_ids` must hold at least one token."
            ),
            tf.debugging.assert_less_equal(
                shape[1],
                a.max_sequence_length,
                message=f"`token_ids` is longer than the model's max_sequence_length={a.max_sequence_length}.",
            ),
            tf.debugging.assert_non_negative(
                token_ids, message="`token_ids` contains a negative id."
            ),
            tf.debugging.assert_less(
                token_ids,
                a.vocabulary_size,
                message=f"`token_ids` contains an id >= vocabulary_size={a.vocabulary_size}.",
            ),
        ]
        with tf.control_dependencies(checks):
            token_ids = tf.identity(token_ids)
            padding_mask = tf.identity(padding_mask)
        logits = a.logits(token_ids, padding_mask)
        return {"logits": tf.cast(logits, tf.float32)}

    # === generate ===
    def tokenize(self, prompts):
        if self.sentencepiece is not None:
            ids = tf.cast(self.sentencepiece.tokenize(prompts), tf.int32)
        else:
            pieces = tf.strings.bytes_split(prompts)
            ids = tf.ragged.map_flat_values(tf.io.decode_raw, pieces, tf.uint8)
            ids = tf.cast(tf.squeeze(ids, -1), tf.int32)
        # The contract's rule (`generation.check_prompt_tokens`): no special
        # id among a prompt's tokens (the text would lose it); the error
        # names the (prompt, token) positions.
        special = tf.reduce_any(
            tf.equal(ids.flat_values[:, None], tf.constant(self.spec.special_ids)), axis=-1
        )
        special = ids.with_flat_values(special).to_tensor(default_value=False)
        check = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(special)),
            [generation.SPECIAL_TOKEN_ERROR, "(prompt, token) positions:", tf.where(special)],
        )
        with tf.control_dependencies([check]):
            ids = tf.identity(ids)
        if self.spec.add_start_token:
            starts = tf.RaggedTensor.from_tensor(
                tf.fill([tf.shape(prompts)[0], 1], self.spec.start_id)
            )
            ids = tf.concat([starts, ids], axis=1)
        return ids

    def detokenize(self, token_ids, keep):
        ids = tf.ragged.boolean_mask(token_ids, keep)
        if self.sentencepiece is not None:
            return self.sentencepiece.detokenize(ids)
        # Generated bytes need not form UTF-8: shown as U+FFFD, as in Keras.
        return _valid_utf8(tf.strings.reduce_join(tf.gather(_byte_table(), ids), axis=-1))

    @staticmethod
    def option_checks(temperature, top_k, top_p, seed):
        """The contract's option checks as graph asserts (same texts).

        The lower float32 bounds (`generation.MIN_TEMPERATURE`, `MIN_TOP_P`:
        2**-126) are checked on the bits: TensorFlow's CPU kernels read a
        subnormal float32 as 0, so `1e-40 > 0` is False in the graph.
        """
        finite = lambda x: tf.reduce_all(tf.math.is_finite(x))  # noqa: E731

        def magnitude(x):
            # |x| as its bits: 0 for +-0, at least 2**-126's bits when normal.
            return tf.bitwise.bitwise_and(tf.bitcast(x, tf.int32), 0x7FFFFFFF)

        def at_least(x, bound):
            return magnitude(x) >= magnitude(tf.constant(bound, tf.float32))

        in_range = tf.logical_and(temperature >= 0, temperature <= generation.MAX_TEMPERATURE)
        zero_or_normal = tf.logical_or(
            tf.equal(magnitude(temperature), 0), at_least(temperature, generation.MIN_TEMPERATURE)
        )
        temperature_ok = tf.logical_and(
            tf.logical_and(finite(temperature), in_range), zero_or_normal
        )
        top_p_ok = tf.logical_and(
            tf.logical_and(top_p > 0, top_p <= 1), at_least(top_p, generation.MIN_TOP_P)
        )
        return [
            _assert(temperature_ok, generation.TEMPERATURE_ERROR),
            _assert(top_k >= 0, generation.TOP_K_ERROR),
            _assert(top_p_ok, generation.TOP_P_ERROR),
            _assert(seed >= 0, generation.SEED_ERROR),
        ]

    def choose(self, logits, options, step):
        """Next ids from `[batch, vocab]` logits: greedy or sampled."""
        logits = tf.cast(logits, tf.float32)
        greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
        if options is None:
            return greedy
        temperature, top_k, top_p, seed = options

        def sample():
            # Any accepted temperature is used as given, down to 2**-126.
            probabilities = filtered_probabilities(logits, temperature, top_k, top_p)
            choice = tf.random.stateless_categorical(
                tf.math.log(probabilities), 1, seed=tf.stack([seed, step]), dtype=tf.int32
            )
            return choice[:, 0]

        # A branch, not a `where`: greedy requests (temperature 0) skip the
        # sort and softmax over the vocabulary at every step.
        return tf.cond(temperature > 0, sample, lambda: greedy)

    def _decode(self, tokens, lengths, max_new_tokens, options):
        """The decoding loop on token ids: `tokens` `[batch, total]` (each
        row's prompt, right-padded) with the new tokens written in.

        Portable graphs carry a state that grows by each step's tokens
        (`growing_cache_writes`): a step reads and copies the tokens so far,
        not a buffer of `total`. XLA needs fixed shapes: with `xla` the state
        is one buffer of `total` positions, the prompt block is prefilled as
        Keras `generate` does (`prefill`, then the last shared prompt position
        as a first step), and rows are written in place.
        """
        a, spec = self.adapter, self.spec
        batch_size = tf.shape(lengths)[0]
        limits, total, start = generation.loop_bounds(tnp, lengths, max_new_tokens)
        growing = contextlib.nullcontext if self.xla else growing_cache_writes
        if self.xla:
            state = a.prefill(tokens, start - 1)
            first = tf.slice(tokens, [0, start - 1], [batch_size, 1])
            logits, state = a.step(first, state, start - 1)
        else:
            with growing():
                logits, state = a.step(tokens[:, :start], a.empty_state(batch_size, 0), 0)
        positions = tf.range(total)[None, :]

        def cond(p, tokens, state, last_logits, done):
            return tf.logical_and(p < total, tf.logical_not(tf.reduce_all(done)))

        def body(p, tokens, state, last_logits, done):
            chosen = self.choose(last_logits, options, p)
            token, tokens, done = generation.decode_position(
                tnp, p, chosen, tokens, positions, lengths, limits, done, spec.end_id
            )
            with growing():
                logits, state = a.step(token[:, None], state, p)
            return p + 1, tokens, state, logits[:, -1], done

        loop_vars = (start, tokens, state, logits[:, -1], tf.zeros([batch_size], tf.bool))
        invariants = None
        if not self.xla:
            any_shape = lambda x: tf.TensorShape([None] * x.shape.rank)  # noqa: E731
            invariants = tf.nest.map_structure(any_shape, loop_vars)
        _, tokens, _, _, _ = tf.while_loop(
            cond,
            body,
            loop_vars,
            shape_invariants=invariants,
            maximum_iterations=total - start,
        )
        return tokens

    def generate(self, prompts, max_new_tokens, options=None):
        a, spec = self.adapter, self.spec
        prompts = tf.convert_to_tensor(prompts)
        checks = [
            tf.debugging.assert_equal(
                tf.rank(prompts), 1, message="`prompts` must be a 1-D batch of strings."
            ),
            _assert(tf.size(prompts) > 0, generation.PROMPTS_ERROR),
            _assert(
                tf.reduce_all(tf.strings.length(prompts, unit="BYTE") > 0),
                generation.EMPTY_PROMPT_ERROR,
            ),
            _assert(max_new_tokens >= 1, generation.MAX_NEW_TOKENS_ERROR),
            # The contract's Unicode rule: a valid UTF-8 prompt transcodes to
            # itself; invalid bytes (encoded surrogates too) would be replaced.
            _assert(
                tf.reduce_all(tf.equal(_valid_utf8(prompts), prompts)), generation.UNICODE_ERROR
            ),
        ]
        if options is not None:
            checks += self.option_checks(*options)
        with tf.control_dependencies(checks):
            prompts = tf.identity(prompts)
        ids = self.tokenize(prompts)
        # int64: `max_new_tokens` near 2**31 must not wrap around.
        needed = ids.row_lengths() + tf.cast(max_new_tokens, tf.int64)
        length_error = generation.LENGTH_ERROR.format(max_sequence_length=a.max_sequence_length)
        with tf.control_dependencies(
            [_assert(tf.reduce_all(needed <= a.max_sequence_length), length_error)]
        ):
            lengths = tf.cast(ids.row_lengths(), tf.int32)
            max_new_tokens = tf.identity(tf.cast(max_new_tokens, tf.int32))
        # The contract's loop (`generation.loop_bounds`, `decode_position`,
        # `shown_tokens`), written once for NumPy and `tf.experimental.numpy`.
        limits, total, _ = generation.loop_bounds(tnp, lengths, max_new_tokens)
        tokens = ids.to_tensor(default_value=spec.pad_id)
        tokens = tf.pad(tokens, [[0, 0], [0, max_new_tokens]], constant_values=spec.pad_id)
        tokens = self.decode(tokens, lengths, max_new_tokens, options)
        positions = tf.range(total)[None, :]
        visible, shown, generated = generation.shown_tokens(
            tnp, tokens, positions, lengths, limits, spec
        )
        return {
            "outputs": self.detokenize(tokens, shown),
            "completions": self.detokenize(tokens, shown & generated),
            "num_new_tokens": tf.reduce_sum(tf.cast(generated & visible, tf.int32), axis=1),
        }


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
