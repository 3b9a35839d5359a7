"""Primer EZ vs our Transformer baseline vs keras-hub's GPT-2: training and decoding speed.

Prints one JSON object a line, one figure each, per backend:

    python benchmarks/primer_speed.py                 # tensorflow, jax, torch
    python benchmarks/primer_speed.py --quick         # tiny config, seconds
    KERAS_BACKEND=jax python benchmarks/primer_speed.py --single-backend
    # the benchmark size, few steps, Primer EZ and GPT-2 only, no decoding:
    python benchmarks/primer_speed.py --repeats 5 --models primer_ez --train-only

Roofline first: the best FLOP/s of a 2048 x 2048 float32 matmul and the best
bytes/s of a 256 MiB copy on this backend. Training (4 layers, width 256,
4 heads, d_ff 1024, context 256, batch 16, float32, `train_on_batch` after a
warm-up) in two compile modes: "default" is what `compile()` gives a user's
`model.fit` (Keras turns XLA off for TensorFlow on CPU-only machines and runs
PyTorch eagerly) and "jit" is `jit_compile=True` (XLA on TensorFlow and JAX,
`torch.compile` on PyTorch, where the figures also say `"torch_compile": true`).
keras-hub's `GPT2CausalLM` of the same size with
dropout 0 is the peer a Keras user would otherwise pick; all models' steps are
interleaved so machine noise hits them alike, and each figure is the median
step. Model FLOPs utilisation = tokens/s x FLOPs per token / matmul peak.
Decoding: per-token latency at position 512, batch 1, cached step vs a full
forward pass over 513 tokens; bandwidth utilisation = (weights + the keys and
values read) / cached step time / copy bandwidth.
"""

import argparse
import json

VARIANTS = {
    "primer_ez": dict(activation="squared_relu", use_dconv=True),
    "primer_ez_without_dconv": dict(activation="squared_relu", use_dconv=False),
    "transformer_baseline": dict(activation="gelu", use_dconv=False),
}
PEER = "keras_hub_gpt2"
COMPILE_MODES = {"default": "auto", "jit": True}


def config(quick: bool) -> dict:
    if quick:
        return dict(
            num_layers=2,
            hidden_dim=64,
            num_heads=4,
            context=64,
            batch=4,
            position=96,
            max_sequence_length=128,
            train_repeats=3,
            decode_repeats=5,
            vocab=256,
            matmul_size=512,
            copy_megabytes=16,
        )
    return dict(
        num_layers=4,
        hidden_dim=256,
        num_heads=4,
        context=256,
        batch=16,
        position=512,
        max_sequence_length=1024,
        train_repeats=10,
        decode_repeats=30,
        vocab=256,
        matmul_size=2048,
        copy_megabytes=256,
    )


def build_models(cfg: dict, jit_compile, variants: list[str]) -> dict:
    import keras
    from timing import keras_hub_gpt2

    from keras_primer import PrimerBackbone, PrimerCausalLM

    size = dict(
        vocabulary_size=cfg["vocab"],
        num_layers=cfg["num_layers"],
        num_heads=cfg["num_heads"],
        hidden_dim=cfg["hidden_dim"],
        intermediate_dim=4 * cfg["hidden_dim"],
        max_sequence_length=cfg["max_sequence_length"],
    )
    models = {}
    for name in variants:
        flags = VARIANTS[name]
        keras.utils.set_random_seed(0)
        models[name] = PrimerCausalLM(PrimerBackbone(**size, **flags))
    keras.utils.set_random_seed(0)
    models[PEER] = keras_hub_gpt2(size)
    for lm in models.values():
        lm.compile(optimizer=keras.optimizers.AdamW(1e-4), jit_compile=jit_compile)
    return models


def decode_seconds(lm, cfg: dict, peer: bool) -> tuple[float, float]:
    """(cached step, uncached forward) median seconds for the token at `position`."""
    from keras import ops
    from timing import compile_function, median_seconds, random_token_ids

    position = cfg["position"]
    prompt = ops.convert_to_tensor(random_token_ids(1, position + 1, cfg["vocab"], seed=1))
    full = compile_function(
        lambda t: lm({"token_ids": t, "padding_mask": ops.ones_like(t)})[:, -1], lm
    )
    step = compile_function(lambda t, c, i: lm.call_with_cache(t, c, i)[0], lm)
    if peer:  # keras-hub sizes the cache from the ids it pre-fills
        padded = ops.pad(prompt[:, :position], [[0, 0], [0, cfg["max_sequence_length"] - position]])
        _, cache = lm._build_cache(padded)
    else:
        cache = lm.empty_cache(1, cfg["max_sequence_length"])
        _, _, cache = lm.call_with_cache(prompt[:, :position], cache, 0)
    token = prompt[:, position:]
    index = ops.convert_to_tensor(position, dtype="int32")
    cached = median_seconds(lambda: step(token, cache, index), cfg["decode_repeats"])
    uncached = median_seconds(lambda: full(prompt), cfg["decode_repeats"])
    return cached, uncached


def measure(
    quick: bool,
    modes: list[str],
    variants: list[str] = tuple(VARIANTS),
    repeats: int | None = None,
    decode: bool = True,
):
    """Yields one figure (a dict) at a time for the current backend.

    `variants` (Primer EZ always included) are trained beside keras-hub GPT-2;
    `repeats` overrides the configuration's number of timed steps.
    """
    import keras
    from roofline import (
        copy_bandwidth,
        decode_bytes_per_token,
        matmul_peak_flops,
        training_flops_per_token,
    )
    from timing import interleaved_train_step_seconds, machine_description

    cfg = config(quick)
    if repeats is not None:
        cfg["train_repeats"] = repeats
    variants = ["primer_ez"] + [name for name in variants if name != "primer_ez"]
    about = {**machine_description(), "quick": quick, "train_repeats": cfg["train_repeats"]}
    peak = matmul_peak_flops(cfg["matmul_size"])
    bandwidth = copy_bandwidth(cfg["copy_megabytes"])
    yield {
        **about,
        "figure": "matmul_peak_gflop_per_s",
        "value": peak / 1e9,
        "size": cfg["matmul_size"],
    }
    yield {**about, "figure": "copy_bandwidth_gb_per_s", "value": bandwidth / 1e9}
    flops_per_token = training_flops_per_token(
        cfg["num_layers"], cfg["hidden_dim"], 4 * cfg["hidden_dim"], cfg["vocab"], cfg["context"]
    )
    tokens = cfg["batch"] * cfg["context"]
    models = None
    for mode in modes:
        try:
            models = build_models(cfg, COMPILE_MODES[mode], variants)
            seconds = interleaved_train_step_seconds(
                models, cfg["batch"], cfg["context"], cfg["vocab"], cfg["train_repeats"]
            )
        except Exception as error:  # e.g. torch.compile unavailable: report, go on
            yield {
                **about,
                "figure": "train_tokens_per_s",
                "compile": mode,
                "error": f"{type(error).__name__}: {error}",
            }
            continue
        if keras.backend.backend() == "torch":
            about_mode = {**about, "torch_compile": mode == "jit"}
        else:
            about_mode = {**about, "xla": mode == "jit" or keras.backend.backend() == "jax"}
        for name, step in seconds.items():
            yield {
                **about_mode,
                "figure": "train_tokens_per_s",
                "compile": mode,
                "model": name,
                "value": tokens / step,
                "step_ms": 1e3 * step,
                "mfu": tokens / step * flops_per_token / peak,
            }
        yield {
            **about_mode,
            "figure": "primer_ez_over_keras_hub_gpt2_tokens_per_s",
            "compile": mode,
            "value": seconds[PEER] / seconds["primer_ez"],
        }
        for name in variants[1:]:
            yield {
                **about_mode,
                "figure": f"primer_ez_over_{name}_tokens_per_s",
                "compile": mode,
                "value": seconds[name] / seconds["primer_ez"],
            }
    if models is None or not decode:
        return
    for name in [n for n in ("primer_ez", "transformer_baseline") if n in models] + [PEER]:
        lm = models[name]
        cached, uncached = decode_seconds(lm, cfg, peer=name == PEER)
        needed = decode_bytes_per_token(
            lm.count_params(), cfg["num_layers"], cfg["hidden_dim"], cfg["position"]
        )
        yield {
            **about,
            "figure": "decode_ms_per_token",
            "model": name,
            "position": cfg["position"],
            "cached_ms": 1e3 * cached,
            "uncached_ms": 1e3 * uncached,
            "cached_over_uncached": cached / uncached,
            "bandwidth_utilisation": needed / cached / bandwidth,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration")
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--modes", default="default,jit", help="compile modes: default,jit")
    parser.add_argument(
        "--models",
        default=",".join(VARIANTS),
        help=f"our models trained beside keras-hub GPT-2 (Primer EZ always): {','.join(VARIANTS)}",
    )
    parser.add_argument("--repeats", type=int, help="timed training steps (default 10; quick 3)")
    parser.add_argument("--train-only", action="store_true", help="skip the decoding figures")
    parser.add_argument(
        "--single-backend", action="store_true", help="measure KERAS_BACKEND only, in this process"
    )
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = sorted(set(models) - set(VARIANTS))
    if unknown:
        parser.error(f"--models: unknown {unknown}; choose from {','.join(VARIANTS)}")
    modes = args.modes.split(",")
    if set(modes) - set(COMPILE_MODES):
        parser.error(f"--modes: choose from {','.join(COMPILE_MODES)}; received {args.modes!r}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be at least 1; received {args.repeats}")
    extra = ["--modes", args.modes, "--models", args.models]
    extra += ["--quick"] if args.quick else []
    extra += ["--repeats", str(args.repeats)] if args.repeats else []
    extra += ["--train-only"] if args.train_only else []
    if args.single_backend:
        for figure in measure(args.quick, modes, models, args.repeats, not args.train_only):
            print(json.dumps(figure), flush=True)
        return
    from timing import json_lines_per_backend

    for figure in json_lines_per_backend(__file__, args.backends.split(","), extra):
        print(json.dumps(figure))


if __name__ == "__main__":
    main()
