"""Feedback Transformer speed vs the Transformer baseline and Primer EZ.

Prints one JSON object: training tokens/s of the Feedback model (shared and
per-layer keys/values) and of the Transformer baseline of the same size, their
ratios, and per-token cached decoding latency of Feedback vs Primer EZ
(`generate()` from a one-token prompt, greedy, after a warm-up call).

The backend comes from KERAS_BACKEND:

    KERAS_BACKEND=jax python benchmarks/feedback_speed.py            # issue config
    KERAS_BACKEND=torch python benchmarks/feedback_speed.py --quick  # tiny config
"""

import argparse
import json
import time

import keras
import numpy as np

from keras_primer.models.feedback import FeedbackBackbone, FeedbackCausalLM
from keras_primer.models.primer import PrimerBackbone, PrimerCausalLM


def _size(args):
    return dict(
        vocabulary_size=args.vocabulary_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        hidden_dim=args.hidden_dim,
        intermediate_dim=4 * args.hidden_dim,
        max_sequence_length=args.context,
    )


def _models(args):
    size = _size(args)
    return {
        "feedback_shared_kv": lambda: FeedbackCausalLM(FeedbackBackbone(shared_kv=True, **size)),
        "feedback_per_layer_kv": lambda: FeedbackCausalLM(FeedbackBackbone(shared_kv=False, **size)),
        "transformer": lambda: PrimerCausalLM(
            PrimerBackbone(activation="relu", use_dconv=False, **size)
        ),
        "primer_ez": lambda: PrimerCausalLM(PrimerBackbone(**size)),
    }


def train_tokens_per_second(make_model, args) -> float:
    model = make_model()
    model.compile(optimizer=keras.optimizers.Adam(1e-4), weighted_metrics=[])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, args.vocabulary_size, (args.batch_size, args.context + 1)).astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    y = ids[:, 1:]
    for _ in range(args.warmup_steps):
        model.train_on_batch(x, y)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        model.train_on_batch(x, y)
    seconds = time.perf_counter() - start
    return args.train_steps * args.batch_size * args.context / seconds


def decode_seconds_per_token(make_model, args) -> float:
    model = make_model()
    model.compile(sampler="greedy")
    length = args.decode_length
    ids = np.zeros((1, length), "int32")
    mask = np.zeros((1, length), "int32")
    ids[0, 0], mask[0, 0] = 1, 1
    inputs = {"token_ids": ids, "padding_mask": mask}
    model.generate(inputs, stop_token_ids=None)  # compile
    start = time.perf_counter()
    for _ in range(args.decode_repeats):
        model.generate(inputs, stop_token_ids=None)
    seconds = time.perf_counter() - start
    return seconds / (args.decode_repeats * (length - 1))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, few steps")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocabulary-size", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--decode-length", type=int, default=64)
    parser.add_argument("--decode-repeats", type=int, default=2)
    parser.add_argument(
        "--models",
        default="feedback_shared_kv,feedback_per_layer_kv,transformer,primer_ez",
        help="comma-separated subset",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_layers, args.hidden_dim, args.num_heads = 2, 32, 2
        args.context, args.batch_size, args.train_steps = 16, 4, 3
        args.warmup_steps, args.decode_length, args.decode_repeats = 1, 12, 1
    chosen = args.models.split(",")
    makers = _models(args)
    result = {"backend": keras.backend.backend(), "config": vars(args), "train_tokens_per_s": {}}
    for name in chosen:
        if name != "primer_ez":
            result["train_tokens_per_s"][name] = train_tokens_per_second(makers[name], args)
    train = result["train_tokens_per_s"]
    if "transformer" in train:
        result["slowdown_vs_transformer"] = {
            name: train["transformer"] / value
            for name, value in train.items()
            if name != "transformer"
        }
    result["decode_ms_per_token"] = {}
    for name in ("feedback_shared_kv", "feedback_per_layer_kv", "primer_ez"):
        if name in chosen:
            result["decode_ms_per_token"][name] = 1e3 * decode_seconds_per_token(makers[name], args)
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
