"""Feedback Transformer speed vs the Transformer baseline and Primer EZ.

Prints one JSON object a line, one figure each: the best FLOP/s of a large
matmul on this backend; training tokens/s and model FLOPs utilisation of the
Feedback model (shared and per-layer keys/values), the Transformer baseline and
keras-hub's GPT-2 of the same size, in both compile modes ("default" is what
`compile()` gives `model.fit`, "jit" is `jit_compile=True`), at contexts 128
and 512, steps interleaved; the Transformer-over-Feedback speed ratios; and
per-token cached decoding latency of Feedback vs Primer EZ (`generate()` from
a one-token prompt, greedy, after a warm-up call).

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


def _feedback_direct_gradient(size):
    """Shared K/V, its gradient by differentiating the time loop directly
    (per-step buffer copies) instead of the recomputing backward pass."""
    backbone = FeedbackBackbone(shared_kv=True, **size)
    backbone.feedback_stack.recompute_backward = False
    return FeedbackCausalLM(backbone)


def _models(args):
    size = _size(args)
    return {
        "feedback_shared_kv": lambda: FeedbackCausalLM(FeedbackBackbone(shared_kv=True, **size)),
        "feedback_direct_gradient": lambda: _feedback_direct_gradient(size),
        # "Primer EZ + Feedback": squared ReLU and MDHA's convolutions.
        "feedback_primer_ez": lambda: FeedbackCausalLM(
            FeedbackBackbone(shared_kv=True, activation="squared_relu", use_dconv=True, **size)
        ),
        "feedback_per_layer_kv": lambda: FeedbackCausalLM(
            FeedbackBackbone(shared_kv=False, **size)
        ),
        "transformer": lambda: PrimerCausalLM(
            PrimerBackbone(activation="relu", use_dconv=False, **size)
        ),
        "primer_ez": lambda: PrimerCausalLM(PrimerBackbone(**size)),
    }


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


COMPILE_MODES = {"default": "auto", "jit": True}
TRAINED = (
    "feedback_shared_kv",
    "feedback_direct_gradient",
    "feedback_primer_ez",
    "feedback_per_layer_kv",
    "transformer",
    "keras_hub_gpt2",
)


def figures(args):
    """Yields one figure (a dict) at a time for the current backend."""
    from roofline import matmul_peak_flops, training_flops_per_token
    from timing import (
        interleaved_train_step_seconds,
        keras_hub_gpt2,
        machine_description,
    )

    about = {**machine_description(), "quick": args.quick}
    peak = matmul_peak_flops(512 if args.quick else 2048)
    yield {**about, "figure": "matmul_peak_gflop_per_s", "value": peak / 1e9}
    chosen = args.models.split(",")
    for context in (int(c) for c in args.contexts.split(",")):
        args.context = context
        makers = {**_models(args), "keras_hub_gpt2": lambda: keras_hub_gpt2(_size(args))}
        flops = training_flops_per_token(
            args.num_layers, args.hidden_dim, 4 * args.hidden_dim, args.vocabulary_size, context
        )
        tokens = args.batch_size * context
        for mode in args.modes.split(","):
            models = {}
            for name in (n for n in TRAINED if n in chosen):
                keras.utils.set_random_seed(0)
                models[name] = makers[name]()
                models[name].compile(
                    optimizer=keras.optimizers.Adam(1e-4), jit_compile=COMPILE_MODES[mode]
                )
            try:
                seconds = interleaved_train_step_seconds(
                    models,
                    args.batch_size,
                    context,
                    args.vocabulary_size,
                    args.train_steps,
                    warmup=args.warmup_steps,
                )
            except Exception as error:  # e.g. torch.compile unavailable: report, go on
                yield {
                    **about,
                    "figure": "train_tokens_per_s",
                    "compile": mode,
                    "context": context,
                    "error": f"{type(error).__name__}: {error}",
                }
                continue
            for name, step in seconds.items():
                yield {
                    **about,
                    "figure": "train_tokens_per_s",
                    "compile": mode,
                    "context": context,
                    "model": name,
                    "value": tokens / step,
                    "mfu": tokens / step * flops / peak,
                }
                if "transformer" in seconds and name.startswith("feedback"):
                    yield {
                        **about,
                        "figure": "transformer_over_feedback_tokens_per_s",
                        "compile": mode,
                        "context": context,
                        "model": name,
                        "value": step / seconds["transformer"],
                    }
    makers = _models(args)
    for name in ("feedback_shared_kv", "feedback_per_layer_kv", "primer_ez"):
        if name in chosen and args.decode_repeats > 0:
            yield {
                **about,
                "figure": "decode_ms_per_token",
                "model": name,
                "length": args.decode_length,
                "value": 1e3 * decode_seconds_per_token(makers[name], args),
            }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny config, few steps")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--hidden-dim", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--contexts", default="128,512", help="training contexts, comma-separated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--vocabulary-size", type=int, default=256)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--warmup-steps", type=int, default=2)
    parser.add_argument("--decode-length", type=int, default=64)
    parser.add_argument(
        "--decode-repeats", type=int, default=2, help="generate() calls timed; 0 skips decoding"
    )
    parser.add_argument("--modes", default="default,jit", help="compile modes: default,jit")
    parser.add_argument(
        "--models",
        default="feedback_shared_kv,feedback_per_layer_kv,transformer,keras_hub_gpt2,primer_ez",
        help="comma-separated subset; also feedback_direct_gradient (shared K/V, gradient "
        "of the loop as written) and feedback_primer_ez (squared ReLU + MDHA convolutions)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_layers, args.hidden_dim, args.num_heads = 2, 32, 2
        args.contexts, args.batch_size, args.train_steps = "16", 4, 3
        args.warmup_steps, args.decode_length, args.decode_repeats = 1, 12, 1
    args.context = max(int(c) for c in args.contexts.split(","))  # decoding's model size
    for figure in figures(args):
        print(json.dumps(figure), flush=True)


if __name__ == "__main__":
    main()
