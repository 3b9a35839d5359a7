"""Primer EZ vs Transformer baseline: training throughput and decoding latency.

Prints one JSON object per backend. Usage:

    python benchmarks/primer_speed.py                 # tensorflow, jax, torch
    python benchmarks/primer_speed.py --quick         # tiny config, seconds
    KERAS_BACKEND=jax python benchmarks/primer_speed.py --single-backend

Training: 4 layers, width 256, 4 heads, context 256, batch 16 (compiled on JAX
and TensorFlow, eager on PyTorch); the three variants' steps are interleaved
so machine noise hits them alike. Decoding: per-token latency at position 512,
cached step vs a full forward pass over 513 tokens.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

VARIANTS = {
    "primer_ez": dict(activation="squared_relu", use_dconv=True),
    "primer_ez_without_dconv": dict(activation="squared_relu", use_dconv=False),
    "transformer_baseline": dict(activation="gelu", use_dconv=False),
}


def config(quick: bool) -> dict:
    if quick:
        return dict(num_layers=2, hidden_dim=64, num_heads=4, context=64, batch=4, position=96,
                    max_sequence_length=128, train_repeats=5, decode_repeats=10)
    return dict(num_layers=4, hidden_dim=256, num_heads=4, context=256, batch=16, position=512,
                max_sequence_length=1024, train_repeats=10, decode_repeats=30)


def measure(quick: bool) -> dict:
    import keras
    from keras import ops

    from keras_primer import PrimerBackbone, PrimerCausalLM
    from keras_primer.benchmarking import (
        compile_function, machine_description, median_seconds, random_token_ids)

    cfg = config(quick)
    backend = keras.backend.backend()
    vocab = 256
    models = {}
    for name, flags in VARIANTS.items():
        keras.utils.set_random_seed(0)
        lm = PrimerCausalLM(PrimerBackbone(
            vocabulary_size=vocab, num_layers=cfg["num_layers"], num_heads=cfg["num_heads"],
            hidden_dim=cfg["hidden_dim"], intermediate_dim=4 * cfg["hidden_dim"],
            max_sequence_length=cfg["max_sequence_length"], **flags))
        lm.compile(optimizer=keras.optimizers.AdamW(1e-4), jit_compile=backend != "torch")
        models[name] = lm

    ids = random_token_ids(cfg["batch"], cfg["context"] + 1, vocab)
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    y = ids[:, 1:]
    step_seconds = {name: [] for name in models}
    for lm in models.values():  # compile + warm up
        for _ in range(2):
            lm.train_on_batch(x, y)
    import time
    for _ in range(cfg["train_repeats"]):
        for name, lm in models.items():
            start = time.perf_counter()
            lm.train_on_batch(x, y)
            step_seconds[name].append(time.perf_counter() - start)
    tokens = cfg["batch"] * cfg["context"]
    training = {
        name: {"step_ms": 1000 * float(np.median(s)), "tokens_per_s": tokens / float(np.median(s))}
        for name, s in step_seconds.items()
    }

    # Decoding latency at `position`, batch 1.
    position = cfg["position"]
    decoding = {}
    for name in ("primer_ez", "transformer_baseline"):
        lm = models[name]
        prompt = ops.convert_to_tensor(random_token_ids(1, position + 1, vocab, seed=1))
        full = compile_function(
            lambda t: lm({"token_ids": t, "padding_mask": ops.ones_like(t)})[:, -1], lm)
        step = compile_function(lambda t, c, i: lm.call_with_cache(t, c, i)[0], lm)
        cache = lm.empty_cache(1, cfg["max_sequence_length"])
        _, _, cache = lm.call_with_cache(prompt[:, :position], cache, 0)
        token = prompt[:, position:]
        index = ops.convert_to_tensor(position, dtype="int32")
        uncached = median_seconds(lambda: full(prompt), cfg["decode_repeats"])
        cached = median_seconds(lambda: step(token, cache, index), cfg["decode_repeats"])
        decoding[name] = {"uncached_ms": 1000 * uncached, "cached_ms": 1000 * cached,
                          "cached_over_uncached": cached / uncached}

    primer = training["primer_ez"]["step_ms"]
    return {
        **machine_description(),
        "config": {k: v for k, v in cfg.items() if "repeats" not in k},
        "training": training,
        "dconv_step_overhead": primer / training["primer_ez_without_dconv"]["step_ms"] - 1,
        "primer_over_baseline_step_time": primer / training["transformer_baseline"]["step_ms"],
        "decoding_at_position": position,
        "decoding": decoding,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration")
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--single-backend", action="store_true",
                        help="measure KERAS_BACKEND only, in this process")
    args = parser.parse_args()
    if args.single_backend:
        print(json.dumps(measure(args.quick)))
        return
    from keras_primer.benchmarking import run_per_backend
    extra = ["--quick"] if args.quick else []
    for result in run_per_backend(__file__, args.backends.split(","), extra):
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
