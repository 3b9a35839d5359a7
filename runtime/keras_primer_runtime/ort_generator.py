"""Text generation with ONNX Runtime from the files of `export_onnx`.

Imports with NumPy, onnxruntime and (for SentencePiece models)
sentencepiece only: no Keras, TensorFlow, JAX or PyTorch. The tokenizer
travels in the export directory (`tokenizer.json`, `tokenizer.model`), the
sampling options, checks and error texts come from
`keras_primer_runtime.generation`, so the text matches Keras `generate` and
the SavedModel signatures. The folder is checked before anything runs
(`keras_primer_runtime.export_folder`): a swapped or edited file is refused
by name.

    from keras_primer_runtime import OrtGenerator
    generator = OrtGenerator("exported/onnx")                 # fp32
    generator.generate(["ROMEO:"], max_new_tokens=32)          # greedy
    generator.generate("ROMEO:", temperature=0.8, top_p=0.9, seed=0)
    for piece in generator.stream("ROMEO:", max_new_tokens=32):
        print(piece, end="", flush=True)

The decoding state (the growing past of every layer, and fixed-size
convolution states) stays in ONNX Runtime `OrtValue`s bound with IOBinding
between tokens, on the device of the session. `CUDAExecutionProvider` is
used when onnxruntime offers it; asking for it when it cannot load raises.
"""

import os

import numpy as np

from keras_primer_runtime import generation
from keras_primer_runtime.export_folder import (
    CONFIG_FILE,
    EXPORT_FORMAT,
    ExportFolderError,
    check_graph_metadata,
    read_export,
)
from keras_primer_runtime.generation.state import LENGTH

__all__ = ["CONFIG_FILE", "EXPORT_FORMAT", "OrtGenerator", "default_providers"]
#: The state axis that starts at 0 and grows by the tokens of each step.
PAST_LENGTH = LENGTH
ORT_MISSING = (
    "onnxruntime is not installed: pip install 'keras-primer-runtime[cpu]' (or [gpu] for "
    "onnxruntime-gpu)."
)


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(ORT_MISSING) from None
    return onnxruntime


def default_providers():
    """CUDA then CPU when this onnxruntime offers CUDA, else CPU."""
    ort = _onnxruntime()

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def _session(path, providers, threads=None):
    ort = _onnxruntime()

    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise RuntimeError(
            f"ONNX Runtime provider(s) {missing} requested but this onnxruntime offers only "
            f"{available}; install onnxruntime-gpu with a matching CUDA, or ask for "
            "providers=['CPUExecutionProvider']."
        )
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    session = ort.InferenceSession(path, options, providers=list(providers))
    dropped = [p for p in providers if p not in session.get_providers()]
    if dropped:  # ORT falls back quietly when a provider library fails to load
        raise RuntimeError(
            f"ONNX Runtime could not load provider(s) {dropped} for {path} (it would have run on "
            f"{session.get_providers()}); check the CUDA/cuDNN libraries, or ask for the CPU."
        )
    return session


class OrtGenerator:
    """Tokenization, cached decoding loop and detokenization around ORT.

    Args:
        onnx_dir: Directory written by `export_onnx` (holds
            `export_config.json`, `decoder_step.onnx`, `model.onnx` and the
            tokenizer files).
        int8: Use the int8-quantized files (`*.int8.onnx`).
        providers: ONNX Runtime execution providers (default: CUDA if
            available, else CPU). A requested provider that cannot load
            raises `RuntimeError`.
        intra_op_num_threads: CPU threads per operator (None: ONNX Runtime's
            default, one per core). Small models on a busy machine decode
            faster with 1: the per-token ops are too small to split.
    """

    def __init__(self, onnx_dir, int8=False, providers=None, intra_op_num_threads=None):
        self.config = read_export(onnx_dir)
        files = self.config["files"]
        suffix = "_int8" if int8 else ""
        if "decoder_step" + suffix not in files:
            raise FileNotFoundError(
                f"{onnx_dir} has no {'int8 ' if int8 else ''}decoder step model; "
                "export with int8=True (`--int8`) to get one."
            )
        self.onnx_dir = onnx_dir
        self.tokenizer, self.codec = generation.load_tokenizer(onnx_dir)
        if self.tokenizer.to_json() != self.config["tokenizer"]:
            raise ExportFolderError(
                f"{os.path.join(onnx_dir, generation.TOKENIZER_FILE)} does not describe the "
                f"tokenizer {CONFIG_FILE} was exported with: re-export the model."
            )
        self.providers = list(providers or default_providers())
        if intra_op_num_threads is not None and (
            isinstance(intra_op_num_threads, bool)
            or not isinstance(intra_op_num_threads, int)
            or intra_op_num_threads < 1
        ):
            raise ValueError(
                f"`intra_op_num_threads` must be an integer >= 1. Received: {intra_op_num_threads!r}"
            )
        self._threads = intra_op_num_threads
        step_path = os.path.join(onnx_dir, files["decoder_step" + suffix])
        self._step = _session(step_path, self.providers, self._threads)
        check_graph_metadata(self.config, self._step.get_modelmeta().custom_metadata_map, step_path)
        self._device = "cuda" if self._step.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._full_path = os.path.join(onnx_dir, files["model" + suffix])
        self._full = None
        # The ONNX tensors of the decoding state (see export/README.md).
        self.state_tensors = self.config["states"]
        self._past_names = [t["past"] for t in self.state_tensors]
        self._present_names = [t["present"] for t in self.state_tensors]
        self._ort = _onnxruntime()
        self.io = self.config["step_io"]
        self.vocabulary_size = int(self.config["vocabulary_size"])
        self.max_sequence_length = int(self.config["max_sequence_length"])

    # === Low level ===

    def _check_ids(self, token_ids, name="token_ids"):
        token_ids = np.asarray(token_ids)
        if token_ids.dtype.kind not in "iu":
            raise ValueError(
                f"`{name}` must hold integer token ids; received dtype {token_ids.dtype}."
            )
        if token_ids.ndim != 2:
            raise ValueError(
                f"`{name}` must have shape [batch, length]; received shape {token_ids.shape}."
            )
        if token_ids.shape[0] < 1 or token_ids.shape[1] < 1:
            raise ValueError(f"`{name}` must not be empty; received shape {token_ids.shape}.")
        if token_ids.min() < 0 or token_ids.max() >= self.vocabulary_size:
            raise ValueError(f"`{name}` ids must lie in [0, {self.vocabulary_size - 1}].")
        return token_ids.astype(np.int32)

    def logits(self, token_ids, padding_mask=None):
        """Full forward pass (`model.onnx`): logits `[batch, length, vocab]`."""
        token_ids = self._check_ids(token_ids)
        if token_ids.shape[1] > self.max_sequence_length:
            raise ValueError(
                f"`token_ids` has length {token_ids.shape[1]} > max_sequence_length={self.max_sequence_length}."
            )
        if padding_mask is None:
            padding_mask = np.ones_like(token_ids)
        padding_mask = np.asarray(padding_mask)
        if padding_mask.shape != token_ids.shape:
            raise ValueError(
                f"`padding_mask` must have the shape of `token_ids` {token_ids.shape}; received {padding_mask.shape}."
            )
        if self._full is None:
            self._full = _session(self._full_path, self.providers, self._threads)
            check_graph_metadata(
                self.config, self._full.get_modelmeta().custom_metadata_map, self._full_path
            )
        feeds = {"input_ids": token_ids, "attention_mask": padding_mask.astype(np.int32)}
        return self._full.run(["logits"], feeds)[0]

    def empty_state(self, batch_size):
        """The decoding state before the first token (NumPy), keyed by the
        `past_*` ONNX names: an empty past (`length` 0) and zero convolution
        states."""
        sizes = {"batch": batch_size, PAST_LENGTH: 0}
        return {
            t["past"]: np.zeros([sizes.get(d, d) for d in t["shape"]], t["dtype"])
            for t in self.state_tensors
        }

    def step(self, token_ids, position, state):
        """One `decoder_step.onnx` call: `(logits [batch, vocab], next_state)`.

        `token_ids` `[batch, n]` are the tokens at `position .. position + n - 1`;
        `state` maps the `past_*` names to NumPy arrays or `OrtValue`s, its
        past holding exactly the `position` positions before (`empty_state`
        for position 0). The next state comes back as `OrtValue`s left on the
        session's device (no copy through NumPy), keyed by the same names.
        """
        ort = self._ort
        token_ids = self._check_ids(token_ids)
        position = int(position)
        values = []
        for t in self.state_tensors:
            value = state[t["past"]]
            if not isinstance(value, ort.OrtValue):
                value = np.asarray(value)
                if value.dtype != np.float32:
                    raise ValueError(
                        f"State `{t['past']}` must be float32; received {value.dtype}."
                    )
            shape = tuple(value.shape() if isinstance(value, ort.OrtValue) else value.shape)
            if len(shape) != len(t["shape"]) or shape[0] != token_ids.shape[0]:
                raise ValueError(
                    f"State `{t['past']}` must have rank {len(t['shape'])} and batch {token_ids.shape[0]}; "
                    f"received shape {shape}."
                )
            if PAST_LENGTH in t["shape"] and shape[t["shape"].index(PAST_LENGTH)] != position:
                raise ValueError(
                    f"State `{t['past']}` must hold the {position} positions before `position`="
                    f"{position}; received shape {shape}."
                )
            values.append(value)
        logits, values = self._run_step(self._new_binding(), token_ids, position, values)
        return logits, {t["past"]: value for t, value in zip(self.state_tensors, values)}

    def _new_binding(self):
        """An IOBinding for one decoding loop (a binding is not shared
        between threads); each step binds its inputs over the previous ones."""
        return self._step.io_binding()

    def _run_step(self, binding, token_ids, position, values):
        """`step` on checked inputs, the state as a list in `state_tensors`
        order: the decoding loop's fast path (no checks)."""
        ort = self._ort
        binding.bind_cpu_input(self.io["input_ids"], np.ascontiguousarray(token_ids, np.int32))
        binding.bind_cpu_input(self.io["cache_position"], np.array(position, np.int32))
        alive = []  # NumPy buffers the bound OrtValues point to, until run
        for name, value in zip(self._past_names, values):
            if not isinstance(value, ort.OrtValue):
                alive.append(value)
                value = ort.OrtValue.ortvalue_from_numpy(value, self._device, 0)
            binding.bind_ortvalue_input(name, value)
        # Outputs unallocated each step (the past grows): the logits to the
        # host, the next state left on the session's device.
        binding.clear_binding_outputs()
        binding.bind_output(self.io["logits"], "cpu")
        for name in self._present_names:
            binding.bind_output(name, self._device)
        self._step.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[1:]

    # === Text ===

    def tokenize(self, prompt):
        """Prompt ids, start token included when the model adds one."""
        return generation.prompt_ids(self.tokenizer, self.codec, prompt)

    def detokenize(self, ids):
        """Text of `ids` without special tokens."""
        return self.codec.decode(ids)

    def _decode(self, prompts, max_new_tokens, temperature, top_k, top_p, seed):
        """The contract's loop (`generation.loop_bounds`, `decode_position`,
        as in the SavedModel): yields `(tokens, lengths, limits)` after each
        decoded position, the last time when every row is done."""
        prompts = generation.check_prompts(prompts)
        options = generation.check_sampling(temperature, top_k, top_p, seed)
        generation.check_max_new_tokens(max_new_tokens)
        ids = [self.tokenize(p) for p in prompts]
        lengths = np.array([len(x) for x in ids], np.int32)
        max_new_tokens = generation.check_max_new_tokens(
            max_new_tokens, int(lengths.max()), self.max_sequence_length
        )
        rng = np.random.default_rng(options.seed)
        limits, total, start = generation.loop_bounds(np, lengths, max_new_tokens)
        tokens = np.full((len(ids), total), self.tokenizer.pad_id, np.int32)
        for row, x in enumerate(ids):
            tokens[row, : len(x)] = x
        positions = np.arange(total)[None, :]
        binding = self._new_binding()
        empty = self.empty_state(len(ids))
        logits, state = self._run_step(binding, tokens[:, :start], 0, list(empty.values()))
        done = np.zeros(len(ids), bool)
        for p in range(start, total):
            chosen = generation.choose_next(logits, options, rng).astype(np.int32)
            token, tokens, done = generation.decode_position(
                np, p, chosen, tokens, positions, lengths, limits, done, self.tokenizer.end_id
            )
            yield tokens, lengths, limits
            if done.all():
                return
            logits, state = self._run_step(binding, token[:, None], p, state)

    def _shown(self, tokens, lengths, limits):
        positions = np.arange(tokens.shape[1])[None, :]
        return generation.shown_tokens(np, tokens, positions, lengths, limits, self.tokenizer)

    def generate(
        self,
        prompts,
        max_new_tokens=32,
        temperature=0.0,
        top_k=0,
        top_p=1.0,
        seed=0,
        return_token_ids=False,
    ):
        """Prompt + completion strings (special tokens removed), as Keras does.

        Each prompt gets at most `max_new_tokens` new tokens and stops at the
        end token. Options as in `keras_primer_runtime.generation` (temperature
        0 = greedy, top_k 0 and top_p 1 = off); prompts follow its Unicode
        rule (invalid UTF-8 bytes or lone surrogates raise `ValueError`).
        """
        single = isinstance(prompts, (str, bytes))
        *_, (tokens, lengths, limits) = self._decode(
            prompts, max_new_tokens, temperature, top_k, top_p, seed
        )
        visible, shown, _ = self._shown(tokens, lengths, limits)
        if return_token_ids:
            return [row[keep].tolist() for row, keep in zip(tokens, visible)]
        texts = [self.detokenize(row[keep]) for row, keep in zip(tokens, shown)]
        return texts[0] if single else texts

    def stream(self, prompt, max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, seed=0):
        """Yields the text of one prompt as its tokens are chosen: the prompt
        first, then each new piece; the pieces join to exactly `generate`'s
        text for the same arguments.

        A piece is held back while it could still change: the bytes of an
        unfinished UTF-8 character (shown as U+FFFD until complete), and
        text a SentencePiece model would spell differently once the next
        piece comes.
        """
        if not isinstance(prompt, (str, bytes)):
            raise ValueError(
                f"`stream` takes one prompt (a string); for a batch use `generate`. "
                f"Received: {type(prompt).__name__}"
            )
        sent = ""
        previous = None
        for tokens, lengths, limits in self._decode(
            prompt, max_new_tokens, temperature, top_k, top_p, seed
        ):
            _, shown, _ = self._shown(tokens, lengths, limits)
            text = self.detokenize(tokens[0][shown[0]])
            # Safe to send: what this text and the one before agree on (a later
            # piece can still respell the last one), less an unfinished character.
            stable = _common_prefix(text, previous) if previous is not None else ""
            stable = stable.rstrip("\ufffd")
            if len(stable) > len(sent) and stable.startswith(sent):
                yield stable[len(sent) :]
                sent = stable
            previous = text
        if not text.startswith(sent):  # cannot happen for prefix-stable codecs
            raise RuntimeError("Streamed text diverged from the final text.")
        if len(text) > len(sent):
            yield text[len(sent) :]


def _common_prefix(a: str, b: str) -> str:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return a[:n]
