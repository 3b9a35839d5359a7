"""Text generation with ONNX Runtime from the files of `export_onnx`.

Needs only `numpy` and `onnxruntime` (no Keras, no TensorFlow):

    from keras_primer.export.ort_generator import OrtGenerator
    generator = OrtGenerator("exported/onnx")             # fp32
    generator.generate(["ROMEO:"], max_new_tokens=32)      # greedy
    generator.generate("ROMEO:", sampler="top_p", top_p=0.9, seed=0)

`CUDAExecutionProvider` is used when onnxruntime offers it, else the CPU.
"""

import json
import os

import numpy as np

CONFIG_FILE = "export_config.json"
SAMPLERS = ("greedy", "top_k", "top_p")


def default_providers():
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OrtGenerator:
    """Byte tokenization, cached decoding loop and detokenization around ORT.

    Args:
        onnx_dir: Directory written by `export_onnx` (holds
            `export_config.json`, `decoder_step.onnx`, `model.onnx`).
        int8: Use the int8-quantized files (`*.int8.onnx`).
        providers: ONNX Runtime execution providers (default: CUDA if
            available, else CPU).
    """

    def __init__(self, onnx_dir, int8=False, providers=None):
        import onnxruntime as ort

        with open(os.path.join(onnx_dir, CONFIG_FILE)) as f:
            self.config = json.load(f)
        files = self.config["files"]
        suffix = "_int8" if int8 else ""
        if "decoder_step" + suffix not in files:
            raise FileNotFoundError(
                f"{onnx_dir} has no {'int8 ' if int8 else ''}decoder step model; "
                "export with int8=True (`--int8`) to get one."
            )
        self.onnx_dir = onnx_dir
        self.providers = list(providers or default_providers())
        options = ort.SessionOptions()
        self._step = ort.InferenceSession(
            os.path.join(onnx_dir, files["decoder_step" + suffix]), options, providers=self.providers
        )
        self._full_path = os.path.join(onnx_dir, files["model" + suffix])
        self._full = None
        self.state_names = list(self.config["states"])
        self.vocabulary_size = int(self.config["vocabulary_size"])
        self.max_sequence_length = int(self.config["max_sequence_length"])

    # === Low level ===

    def _check_ids(self, token_ids, name="token_ids"):
        token_ids = np.asarray(token_ids)
        if token_ids.dtype.kind not in "iu":
            raise ValueError(f"`{name}` must hold integer token ids; received dtype {token_ids.dtype}.")
        if token_ids.ndim != 2:
            raise ValueError(f"`{name}` must have shape [batch, length]; received shape {token_ids.shape}.")
        if token_ids.shape[0] < 1 or token_ids.shape[1] < 1:
            raise ValueError(f"`{name}` must not be empty; received shape {token_ids.shape}.")
        if token_ids.size and (token_ids.min() < 0 or token_ids.max() >= self.vocabulary_size):
            raise ValueError(f"`{name}` ids must lie in [0, {self.vocabulary_size - 1}].")
        return token_ids.astype(np.int32)

    def logits(self, token_ids, padding_mask=None):
        """Full forward pass (`model.onnx`): logits `[batch, length, vocab]`."""
        import onnxruntime as ort

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
            self._full = ort.InferenceSession(self._full_path, providers=self.providers)
        feeds = {"token_ids": token_ids, "padding_mask": padding_mask.astype(np.int32)}
        return self._full.run(["logits"], feeds)[0]

    def empty_state(self, batch_size, max_length):
        """Zero decoding states: batch (axis 0) and `max_length` filled in."""
        state = {}
        for name, spec in self.config["states"].items():
            shape = list(spec["shape"])
            shape[0] = batch_size
            shape = [max_length if d == -1 else d for d in shape]
            state[name] = np.zeros(shape, np.float32)
        return state

    def step(self, token_ids, position, state):
        """One `decoder_step.onnx` call: `(logits [batch, vocab], next_state)`."""
        token_ids = self._check_ids(token_ids)
        feeds = {"token_ids": token_ids, "position": np.asarray(position, np.int32).reshape(())}
        for name in self.state_names:
            value = np.asarray(state[name])
            if value.dtype != np.float32 or value.ndim != len(self.config["states"][name]["shape"]):
                raise ValueError(
                    f"State `{name}` must be float32 of rank {len(self.config['states'][name]['shape'])}; "
                    f"received {value.dtype} of shape {value.shape}."
                )
            if value.shape[0] != token_ids.shape[0]:
                raise ValueError(
                    f"State `{name}` has batch {value.shape[0]}, `token_ids` has batch {token_ids.shape[0]}."
                )
            feeds[f"past_{name}"] = value
        outputs = self._step.run(None, feeds)
        return outputs[0], dict(zip(self.state_names, outputs[1:]))

    # === Text ===

    def tokenize(self, prompt):
        ids = list(prompt.encode("utf-8", errors="surrogateescape") if isinstance(prompt, str) else prompt)
        if self.config.get("add_start_token", True):
            ids = [self.config["start_id"]] + ids
        return ids

    def detokenize(self, ids):
        special = set(self.config["special_ids"])
        return bytes(i for i in ids if i not in special).decode("utf-8", errors="replace")

    def _check_prompts(self, prompts, max_new_tokens):
        if isinstance(prompts, (str, bytes)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("`prompts` must be a non-empty string or list of strings.")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, (str, bytes)):
                raise ValueError(f"Prompt {i} must be a string; received {type(prompt).__name__}.")
            if len(prompt) == 0:
                raise ValueError(f"Prompt {i} is empty; send at least one character.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise ValueError(f"`max_new_tokens` must be an integer; received {max_new_tokens!r}.")
        ids = [self.tokenize(p) for p in prompts]
        longest = max(len(x) for x in ids)
        if max_new_tokens < 1 or longest + max_new_tokens > self.max_sequence_length:
            raise ValueError(
                f"`max_new_tokens` must be between 1 and {self.max_sequence_length - longest} here: "
                f"the longest prompt has {longest} tokens (start token included) and the model's "
                f"max_sequence_length is {self.max_sequence_length}. Received: {max_new_tokens}"
            )
        return ids

    def _choose(self, logits, sampler, temperature, top_k, top_p, rng):
        if sampler == "greedy":
            return logits.argmax(-1).astype(np.int32)
        scaled = logits.astype(np.float64) / max(float(temperature), 1e-6)
        order = np.argsort(-scaled, axis=-1, kind="stable")
        sorted_logits = np.take_along_axis(scaled, order, axis=-1)
        probs = np.exp(sorted_logits - sorted_logits[:, :1])
        probs /= probs.sum(-1, keepdims=True)
        keep = np.ones_like(probs, bool)
        if sampler == "top_k":
            keep[:, int(top_k):] = False
        else:
            keep = (np.cumsum(probs, -1) - probs) < top_p
        keep[:, 0] = True
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(-1, keepdims=True)
        picks = np.array([rng.choice(probs.shape[1], p=row) for row in probs])
        return np.take_along_axis(order, picks[:, None], axis=-1)[:, 0].astype(np.int32)

    def generate(self, prompts, max_new_tokens=32, sampler="greedy", temperature=1.0,
                 top_k=10, top_p=0.9, seed=None, return_token_ids=False):
        """Prompt + completion strings (special tokens removed), as Keras does.

        Each prompt gets at most `max_new_tokens` new tokens and stops at the
        end token. `sampler` is "greedy", "top_k" or "top_p".
        """
        if sampler not in SAMPLERS:
            raise ValueError(f"`sampler` must be one of {SAMPLERS}; received {sampler!r}.")
        if sampler == "top_k" and int(top_k) < 1:
            raise ValueError("`top_k` must be >= 1.")
        if sampler == "top_p" and not 0 < float(top_p) <= 1:
            raise ValueError("`top_p` must be in (0, 1].")
        single = isinstance(prompts, (str, bytes))
        ids = self._check_prompts(prompts, max_new_tokens)
        rng = np.random.default_rng(seed)
        lengths = np.array([len(x) for x in ids])
        batch, total = len(ids), int(lengths.max()) + int(max_new_tokens)
        pad, end = self.config["pad_id"], self.config["end_id"]
        tokens = np.full((batch, total), pad, np.int32)
        for row, x in enumerate(ids):
            tokens[row, : len(x)] = x
        limits = lengths + max_new_tokens
        start = int(lengths.min())
        state = self.empty_state(batch, total)
        logits, state = self.step(tokens[:, :start], 0, state)
        done = np.zeros(batch, bool)
        ended = np.full(batch, total)
        for p in range(start, total):
            chosen = self._choose(logits, sampler, temperature, top_k, top_p, rng)
            in_prompt = p < lengths
            chosen = np.where(in_prompt, tokens[:, p], chosen)
            tokens[:, p] = chosen
            new_end = ~in_prompt & (chosen == end) & (ended == total)
            ended = np.where(new_end, p, ended)
            done |= new_end | (p + 1 >= limits)
            if done.all():
                break
            logits, state = self.step(tokens[:, p : p + 1], p, state)
        results = []
        for row in range(batch):
            stop = min(int(limits[row]), int(ended[row]) + 1)
            results.append(tokens[row, :stop].tolist())
        if return_token_ids:
            return results
        texts = [self.detokenize(x) for x in results]
        return texts[0] if single else texts
