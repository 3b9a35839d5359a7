"""Hugging Face Optimum's ONNX Runtime stack on a GPT-2 of keras-primer's size.

The other side of the serving comparison (docs/benchmarks.md, "Serving: ONNX
Runtime and SavedModel vs Hugging Face Optimum"): a random-weight GPT-2
(`transformers.GPT2LMHeadModel`, no download) exported by Optimum to its
decoder-with-past ONNX graph, then timed two ways:

* `optimum_generate_seconds`: one `ORTModelForCausalLM.generate` call, greedy,
  exactly `new_tokens` new tokens (no early stop);
* `bare_generate_seconds`: a bare NumPy greedy loop over the same ONNX graph
  with an `onnxruntime.InferenceSession` (the cost of the graph without
  transformers' generation loop).

Needs torch, transformers, optimum and optimum-onnx, pinned in
requirements/optimum-bench.txt, in a virtual environment of its own (not the
test environment's; not part of the test suite or CI):

    python3.11 -m venv .venv-optimum
    .venv-optimum/bin/pip install -r requirements/optimum-bench.txt
    .venv-optimum/bin/python benchmarks/optimum_gpt2.py

prints one JSON line per cell (batch 1 and 8, 64 and 256 new tokens, an
8-token prompt; the median of 5 calls after a warm-up call; ONNX Runtime's
default threads) for each of the two. Runs offline (`HF_HUB_OFFLINE=1`).
Medians, not minima: the machine may be shared.
"""

import argparse
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np

REQUIREMENTS = "requirements/optimum-bench.txt"
INSTALL = (
    "python3.11 -m venv .venv-optimum && "
    f".venv-optimum/bin/pip install -r {REQUIREMENTS} && "
    ".venv-optimum/bin/python benchmarks/optimum_gpt2.py"
)
# The token GPT-2 ends on, suppressed until `new_tokens` are generated (as
# `min_new_tokens` does), so every call makes the same number of tokens.
END_TOKEN = 0


def _missing_message(error):
    return (
        f"benchmarks/optimum_gpt2.py needs torch, transformers, optimum and optimum-onnx "
        f"({error}). Install the pinned set ({REQUIREMENTS}; torch is PyTorch's CPU build) "
        f"in a virtual environment of its own:\n  {INSTALL}"
    )


def _optimum():
    """(torch, transformers, ORTModelForCausalLM), or ImportError that says how
    to install them."""
    try:
        import torch
        import transformers
        from optimum.onnxruntime import ORTModelForCausalLM
    except ImportError as e:
        raise ImportError(_missing_message(e)) from e
    return torch, transformers, ORTModelForCausalLM


def build_optimum_gpt2(
    out_dir,
    num_layers=4,
    hidden_dim=256,
    num_heads=4,
    intermediate_dim=1024,
    vocabulary_size=256,
    max_positions=512,
    seed=0,
):
    """A random-weight GPT-2 exported by Optimum to ONNX (decoder with past).

    Writes the transformers checkpoint to `out_dir/transformers` and Optimum's
    export to `out_dir/onnx`; returns the latter (`ORTModelForCausalLM.
    from_pretrained` loads it; `model.onnx` is the graph).
    """
    torch, transformers, ORTModelForCausalLM = _optimum()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=num_layers,
        n_embd=hidden_dim,
        n_head=num_heads,
        n_inner=intermediate_dim,
        vocab_size=vocabulary_size,
        n_positions=max_positions,
        bos_token_id=END_TOKEN,
        eos_token_id=END_TOKEN,
        pad_token_id=END_TOKEN,
    )
    checkpoint = os.path.join(out_dir, "transformers")
    transformers.GPT2LMHeadModel(config).eval().save_pretrained(checkpoint)
    onnx_dir = os.path.join(out_dir, "onnx")
    ORTModelForCausalLM.from_pretrained(checkpoint, export=True, use_cache=True).save_pretrained(
        onnx_dir
    )
    return onnx_dir


def load_optimum(onnx_dir, provider="CPUExecutionProvider"):
    """Optimum's `ORTModelForCausalLM` for the export of `build_optimum_gpt2`
    (ONNX Runtime's default threads; `provider` CPU or CUDA)."""
    _, _, ORTModelForCausalLM = _optimum()
    return ORTModelForCausalLM.from_pretrained(onnx_dir, provider=provider)


def prompt_ids(batch_size, prompt_length, vocabulary_size=256, seed=0):
    """Random prompt token ids, int64 (batch_size, prompt_length), never the end token."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, vocabulary_size, (batch_size, prompt_length)).astype(np.int64)


def optimum_generate(model, input_ids, new_tokens):
    """Token ids (prompt + `new_tokens`) of one greedy Optimum `generate` call."""
    import torch

    ids = torch.from_numpy(input_ids)
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=END_TOKEN,
        use_cache=True,
    )
    assert out.shape == (ids.shape[0], ids.shape[1] + new_tokens), out.shape
    return out.numpy()


def optimum_generate_seconds(model, batch_size, prompt_length, new_tokens):
    """Seconds of one greedy Optimum `generate` call, `new_tokens` new tokens
    for each of `batch_size` random prompts of `prompt_length` tokens."""
    input_ids = prompt_ids(batch_size, prompt_length, model.config.vocab_size)
    start = time.perf_counter()
    optimum_generate(model, input_ids, new_tokens)
    return time.perf_counter() - start


_NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


class BareGreedy:
    """A bare NumPy greedy loop over Optimum's decoder-with-past ONNX graph.

    Feeds `input_ids`, `attention_mask`, `position_ids` (when the graph takes
    them) and `past_key_values.*`; reads `logits` and `present.*`, whose
    arrays are the next step's past. Suppresses the end token, as
    `min_new_tokens` does in `generate`.
    """

    def __init__(self, onnx_path, intra_op_num_threads=None, providers=("CPUExecutionProvider",)):
        import onnxruntime as ort

        if os.path.isdir(onnx_path):
            onnx_path = os.path.join(onnx_path, "model.onnx")
        options = ort.SessionOptions()
        if intra_op_num_threads is not None:
            options.intra_op_num_threads = intra_op_num_threads
        self.session = ort.InferenceSession(onnx_path, options, providers=list(providers))
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.past = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.outputs = ["logits"] + [
            n.replace("past_key_values.", "present.", 1) for n in self.past
        ]
        names = {o.name for o in self.session.get_outputs()}
        assert set(self.outputs) <= names, (self.outputs, names)

    def _empty_past(self, batch_size):
        past = {}
        for name in self.past:
            meta = self.inputs[name]  # [batch, heads, past length, head size]
            shape = [batch_size, meta.shape[1], 0, meta.shape[3]]
            past[name] = np.zeros(shape, _NUMPY_TYPES[meta.type])
        return past

    def generate(self, input_ids, new_tokens):
        """Token ids (prompt + `new_tokens`), greedy."""
        batch_size, length = input_ids.shape
        tokens = np.asarray(input_ids, np.int64)
        step_ids = tokens
        past = self._empty_past(batch_size)
        for _ in range(new_tokens):
            total = tokens.shape[1]
            feed = {"input_ids": step_ids, "attention_mask": np.ones((batch_size, total), np.int64)}
            if "position_ids" in self.inputs:
                start = total - step_ids.shape[1]
                feed["position_ids"] = np.broadcast_to(
                    np.arange(start, total, dtype=np.int64), step_ids.shape
                ).copy()
            if "use_cache_branch" in self.inputs:  # older merged exports
                feed["use_cache_branch"] = np.array([total > step_ids.shape[1]])
            feed.update(past)
            logits, *present = self.session.run(self.outputs, feed)
            last = logits[:, -1, :]
            last[:, END_TOKEN] = -np.inf
            step_ids = last.argmax(-1).astype(np.int64)[:, None]
            tokens = np.concatenate([tokens, step_ids], axis=1)
            past = dict(zip(self.past, present))
        assert tokens.shape == (batch_size, length + new_tokens)
        return tokens


def bare_generate_seconds(runner, batch_size, prompt_length, new_tokens, vocabulary_size=256):
    """Seconds of one `BareGreedy.generate` call, the same work as
    `optimum_generate_seconds`."""
    input_ids = prompt_ids(batch_size, prompt_length, vocabulary_size)
    start = time.perf_counter()
    runner.generate(input_ids, new_tokens)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="folder for the model files (default: a temporary one)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded
    try:
        _optimum()
    except ImportError as e:
        print(e, file=sys.stderr)
        return 2

    versions = {
        name: importlib.metadata.version(name)
        for name in ("torch", "transformers", "optimum", "optimum-onnx", "onnxruntime")
    }
    with tempfile.TemporaryDirectory() as scratch:
        onnx_dir = build_optimum_gpt2(args.out or scratch)
        model = load_optimum(onnx_dir)
        bare = BareGreedy(onnx_dir)
        for batch_size in args.batch_sizes:
            for new_tokens in args.new_tokens:
                shape = (batch_size, args.prompt_length, new_tokens)
                ids = prompt_ids(batch_size, args.prompt_length)
                # A warm-up call each, which must give the same tokens.
                same = np.array_equal(
                    optimum_generate(model, ids, new_tokens), bare.generate(ids, new_tokens)
                )
                for runner, seconds in (
                    ("optimum_generate", lambda: optimum_generate_seconds(model, *shape)),
                    ("bare_ort_loop", lambda: bare_generate_seconds(bare, *shape)),
                ):
                    median = statistics.median(seconds() for _ in range(args.repeats))
                    line = {
                        "runner": runner,
                        "batch_size": batch_size,
                        "prompt_length": args.prompt_length,
                        "new_tokens": new_tokens,
                        "repeats": args.repeats,
                        "median_s": round(median, 4),
                        # One decoding step: one new token for the whole batch.
                        "ms_per_step": round(1000 * median / new_tokens, 3),
                        "same_tokens": bool(same),
                        **versions,
                    }
                    print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
