"""Per-token CPU decoding latency: Keras vs SavedModel vs ONNX Runtime fp32/int8.

    python benchmarks/export_speed.py                      # random tiny-ish Primer EZ
    python benchmarks/export_speed.py --model model.keras  # a trained file
    python benchmarks/export_speed.py --hidden-dim 128 --num-layers 4 --new-tokens 64

Prints one JSON object: median milliseconds per decoding step (whole batch)
and per generated token, at batch 1 and 8, for Keras cached `generate()`
(greedy, compiled, after a warm-up call), the SavedModel
`generate_with_options` signature, and the ONNX Runtime generator
(IOBinding, state kept in OrtValues) with fp32 and int8 models (MatMul
weights quantized per channel); the ratios ORT / Keras and int8 / fp32 from
the same run; the artefact sizes; and the int8 next-token agreement with
fp32. Runs under the TensorFlow backend (re-executes itself with
KERAS_BACKEND=tensorflow). Medians, not minima: the machine may be shared.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

PROMPT = "ROMEO: "


def _dir_size(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def _timed(fn, repeats):
    fn()  # warm-up (tracing / compilation / session init)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _build_model(args):
    import keras
    import numpy as np

    from keras_primer import (
        PrimerBackbone,
        PrimerCausalLM,
        PrimerCausalLMPreprocessor,
        PrimerTokenizer,
    )

    keras.utils.set_random_seed(0)
    backbone = PrimerBackbone(
        vocabulary_size=256,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        intermediate_dim=4 * args.hidden_dim,
        max_sequence_length=args.max_sequence_length,
    )
    lm = PrimerCausalLM(backbone, PrimerCausalLMPreprocessor(PrimerTokenizer(), sequence_length=64))
    rng = np.random.default_rng(0)  # spread-out weights: varied, non-trivial outputs
    lm.set_weights(
        [
            (rng.normal(0, 0.2, w.shape) + (1.0 if "gamma" in v.path else 0.0)).astype("float32")
            for v, w in zip(lm.weights, lm.get_weights())
        ]
    )
    return lm


def run(args):
    import keras
    import numpy as np
    import tensorflow as tf

    from keras_primer.export import export_model
    from keras_primer.export.adapters import load_float32
    from keras_primer.export.onnx_int8 import int8_agreement
    from keras_primer_runtime.ort_generator import OrtGenerator

    work = tempfile.mkdtemp(prefix="export_speed_")
    model_path = args.model
    if model_path is None:
        model_path = os.path.join(work, "bench.keras")
        _build_model(args).save(model_path)
    lm = load_float32(model_path)
    written = export_model(
        model_path,
        os.path.join(work, "out"),
        name="bench",
        int8=True,
        max_new_tokens=args.new_tokens,
    )
    serving = tf.saved_model.load(written["saved_model"]).signatures["generate_with_options"]
    onnx_dir = os.path.dirname(written["onnx"]["config"])
    ort_fp32, ort_int8 = OrtGenerator(onnx_dir), OrtGenerator(onnx_dir, int8=True)
    # One thread per op: the per-token ops of a small model are too small to
    # split, and on a busy machine spinning worker threads cost more.
    ort_fp32_1t = OrtGenerator(onnx_dir, intra_op_num_threads=1)
    ort_int8_1t = OrtGenerator(onnx_dir, int8=True, intra_op_num_threads=1)
    prompt_tokens = len(PROMPT.encode()) + 1
    new = args.new_tokens
    lm.compile(sampler="greedy")

    results = {
        "model": {
            "path": args.model or "random",
            "parameters": int(lm.count_params()),
            "num_layers": int(lm.backbone.num_layers),
            "hidden_dim": int(lm.backbone.hidden_dim),
        },
        "prompt_tokens": prompt_tokens,
        "new_tokens": new,
        "threads": os.cpu_count(),
        "latency_ms": {},
        "ratios": {},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    for batch in (1, 8):
        prompts = [PROMPT] * batch
        timings = {}
        seconds, _ = _timed(
            lambda: lm.generate(prompts, max_length=prompt_tokens + new, stop_token_ids=None),
            args.repeats,
        )
        timings["keras_generate"] = (seconds, new)
        sm_inputs = dict(
            prompts=tf.constant(prompts),
            max_new_tokens=tf.constant(new),
            temperature=tf.constant(0.0),
            top_k=tf.constant(0),
            top_p=tf.constant(1.0),
            seed=tf.constant(0),
        )
        seconds, out = _timed(lambda: serving(**sm_inputs), args.repeats)
        timings["saved_model_generate"] = (seconds, int(out["num_new_tokens"].numpy().max()))
        for name, generator in (
            ("ort_fp32", ort_fp32),
            ("ort_int8", ort_int8),
            ("ort_fp32_1thread", ort_fp32_1t),
            ("ort_int8_1thread", ort_int8_1t),
        ):
            seconds, ids = _timed(
                lambda: generator.generate(prompts, max_new_tokens=new, return_token_ids=True),
                args.repeats,
            )
            timings[name] = (seconds, max(len(x) for x in ids) - prompt_tokens)
        results["latency_ms"][f"batch_{batch}"] = {
            name: {
                "total_ms": round(1000 * s, 2),
                "steps": steps,
                "ms_per_step": round(1000 * s / max(steps, 1), 3),
                "ms_per_token": round(1000 * s / max(steps, 1) / batch, 3),
            }
            for name, (s, steps) in timings.items()
        }
        per_step = {k: v["ms_per_step"] for k, v in results["latency_ms"][f"batch_{batch}"].items()}
        results["ratios"][f"batch_{batch}"] = {
            "ort_fp32_over_keras": round(per_step["ort_fp32"] / per_step["keras_generate"], 3),
            "ort_int8_over_ort_fp32": round(per_step["ort_int8"] / per_step["ort_fp32"], 3),
            "ort_fp32_1thread_over_keras": round(
                per_step["ort_fp32_1thread"] / per_step["keras_generate"], 3
            ),
            "ort_int8_1thread_over_ort_fp32_1thread": round(
                per_step["ort_int8_1thread"] / per_step["ort_fp32_1thread"], 3
            ),
            "saved_model_over_keras": round(
                per_step["saved_model_generate"] / per_step["keras_generate"], 3
            ),
        }
    results["sizes_bytes"] = {
        "keras_file": _dir_size(model_path),
        "saved_model": _dir_size(written["saved_model"]),
        **{f"onnx_{k}": _dir_size(v) for k, v in written["onnx"].items() if k != "config"},
    }
    rng = np.random.default_rng(0)
    # Next-token agreement on text-like ids, every position of 16 sequences.
    ids = rng.integers(32, 127, (16, min(64, lm.backbone.max_sequence_length))).astype("int32")
    results["int8_vs_fp32"] = int8_agreement(
        written["onnx"]["model"], written["onnx"]["model_int8"], ids
    )
    greedy32 = ort_fp32.generate([PROMPT] * 2, max_new_tokens=new, return_token_ids=True)
    greedy8 = ort_int8.generate([PROMPT] * 2, max_new_tokens=new, return_token_ids=True)
    results["int8_vs_fp32"]["greedy_identical"] = greedy32 == greedy8
    results["keras_backend"] = keras.backend.backend()
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help=".keras file (default: a random Primer EZ)")
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--max-sequence-length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        env = dict(os.environ, KERAS_BACKEND="tensorflow")
        return subprocess.call(
            [sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env=env
        )
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
