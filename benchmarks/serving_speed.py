"""Serving speed: ms per generated token of our exports against Hugging Face Optimum.

The comparison a platform team makes (docs/benchmarks.md, "Serving"):
random-weight models of one size (4 layers, width 256, 4 heads, d_ff 1024,
byte vocabulary, context 512), greedy, 8-token prompts (a different one per
row), batch 1 and 8, 64 and 256 new tokens, the runtimes timed in turn in
one process (interleaved, after a warm-up call each), medians.

    # 1. In the test environment (.venv): the models, saved and exported.
    python benchmarks/serving_speed.py export --out /tmp/serving
    # 2. Keras `generate` (XLA) vs the SavedModel (portable, and `--xla`) vs
    #    OrtGenerator, one process.
    python benchmarks/serving_speed.py time --out /tmp/serving \
        --runtimes keras,saved_model,saved_model_xla,ort
    # 3. OrtGenerator vs Optimum, one process, in the Optimum environment
    #    (requirements/optimum-bench.txt; see benchmarks/optimum_gpt2.py).
    .venv-optimum/bin/python benchmarks/serving_speed.py time --out /tmp/serving \
        --runtimes ort,optimum,optimum_bare

Prints one JSON line per runtime, model and cell: the median milliseconds
per decoding step (the whole batch) and per generated token (a step over
the batch size), and the steps run; then one line per cell with each
runtime's ratio to the first runtime listed. A runtime whose packages are
missing is named with the command that installs them (exit 2).
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.dirname(os.path.abspath(__file__))
# The size of the comparison: Optimum's GPT-2 is built with the same numbers.
SIZE = dict(num_layers=4, num_heads=4, hidden_dim=256, intermediate_dim=1024, max_length=512)
MODELS = ("primer_ez", "transformer")
# Eight 7-byte prompts (8 tokens with the start token), one per batch row.
PROMPTS = ["ROMEO: ", "JULIET:", "Nurse: ", "HAMLET:", "First: ", "KING L:", "Second:", "MACBETH"]
PROMPT_TOKENS = 8
CELLS = [(1, 64), (8, 64), (1, 256), (8, 256)]
RUNTIMES = ("keras", "saved_model", "saved_model_xla", "ort", "optimum", "optimum_bare")


def _machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def export(out: str, models, seed: int) -> None:
    """Random-weight models of `SIZE`, saved (`.keras`) and exported (ONNX +
    SavedModel) under `out/<model>/`; Optimum's GPT-2 is built by the `time`
    step in its own environment."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import numpy as np

    from keras_primer.export import export_model
    from keras_primer.models.registry import build_causal_lm
    from keras_primer_cli.presets import get_preset
    from keras_primer_runtime.generation import ByteCodec

    preset = get_preset(
        "tiny",
        num_layers=SIZE["num_layers"],
        num_heads=SIZE["num_heads"],
        hidden_dim=SIZE["hidden_dim"],
        intermediate_dim=SIZE["intermediate_dim"],
        sequence_length=SIZE["max_length"],
        dropout=0.0,
    )
    for name in models:
        keras.utils.set_random_seed(seed)
        lm = build_causal_lm(name, preset, ByteCodec())
        # Spread-out weights (as export_speed.py): varied, non-trivial text.
        rng = np.random.default_rng(seed)
        lm.set_weights(
            [
                (rng.normal(0, 0.2, w.shape) + (1.0 if "gamma" in v.path else 0.0)).astype(
                    "float32"
                )
                for v, w in zip(lm.weights, lm.get_weights())
            ]
        )
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        lm.save(os.path.join(folder, "model.keras"))
        export_model(
            os.path.join(folder, "model.keras"),
            os.path.join(folder, "export"),
            name=name,
            overwrite=True,
        )
        # The same model's SavedModel with its loop XLA-compiled (`--xla`).
        export_model(
            os.path.join(folder, "model.keras"),
            os.path.join(folder, "export"),
            name=f"{name}_xla",
            xla=True,
            onnx=False,
            overwrite=True,
        )
        print(json.dumps({"exported": name, "folder": folder}), flush=True)


# === Runners: each `run(batch, new_tokens) -> steps`, timed around the call ===


def _providers(device):
    return ["CUDAExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def _ort_runner(folder, device):
    sys.path.insert(0, os.path.join(ROOT, "runtime"))  # the runtime alone suffices
    from keras_primer_runtime import OrtGenerator

    # On CUDA the state stays on the device between steps (IOBinding).
    generator = OrtGenerator(os.path.join(folder, "export", "onnx"), providers=_providers(device))

    def run(batch, new_tokens):
        ids = generator.generate(PROMPTS[:batch], max_new_tokens=new_tokens, return_token_ids=True)
        return max(len(row) for row in ids) - PROMPT_TOKENS

    return run


def _saved_model_runner(folder, name):
    import tensorflow as tf

    version = os.path.join(folder, "export", "serving", name, "1")
    signature = tf.saved_model.load(version).signatures["generate_with_options"]

    def run(batch, new_tokens):
        out = signature(
            prompts=tf.constant(PROMPTS[:batch]),
            max_new_tokens=tf.constant(new_tokens),
            temperature=tf.constant(0.0),
            top_k=tf.constant(0),
            top_p=tf.constant(1.0),
            seed=tf.constant(0),
        )
        return int(out["num_new_tokens"].numpy().max())

    return run


def _keras_runner(folder):
    import keras

    import keras_primer  # noqa: F401  registers the classes

    lm = keras.saving.load_model(os.path.join(folder, "model.keras"), compile=False)
    lm.compile(sampler="greedy", jit_compile=True)  # XLA, as a Keras user generates

    def run(batch, new_tokens):
        out = lm.generate(
            PROMPTS[:batch], max_length=PROMPT_TOKENS + new_tokens, stop_token_ids=None
        )
        assert len(out) == batch
        return new_tokens

    return run


def _optimum_runners(out, device):
    sys.path.insert(0, BENCHMARKS)
    import optimum_gpt2

    onnx_dir = os.path.join(out, "optimum_gpt2", "onnx")
    if not os.path.isdir(onnx_dir):
        optimum_gpt2.build_optimum_gpt2(
            os.path.join(out, "optimum_gpt2"),
            num_layers=SIZE["num_layers"],
            hidden_dim=SIZE["hidden_dim"],
            num_heads=SIZE["num_heads"],
            intermediate_dim=SIZE["intermediate_dim"],
            vocabulary_size=256,
            max_positions=SIZE["max_length"],
        )
    model = optimum_gpt2.load_optimum(onnx_dir, provider=_providers(device)[0])
    bare = optimum_gpt2.BareGreedy(onnx_dir, providers=_providers(device))

    def run_generate(batch, new_tokens):
        ids = optimum_gpt2.prompt_ids(batch, PROMPT_TOKENS)
        optimum_gpt2.optimum_generate(model, ids, new_tokens)
        return new_tokens

    def run_bare(batch, new_tokens):
        bare.generate(optimum_gpt2.prompt_ids(batch, PROMPT_TOKENS), new_tokens)
        return new_tokens

    return {"optimum": run_generate, "optimum_bare": run_bare}


def _runners(out, runtimes, models, device):
    """`{(runtime, model): run}`; exits 2 naming the install for a missing package."""
    runners = {}
    try:
        for runtime in runtimes:
            if runtime in ("optimum", "optimum_bare"):
                optimum = _optimum_runners(out, device)
                runners[(runtime, "gpt2")] = optimum[runtime]
                continue
            for name in models:
                folder = os.path.join(out, name)
                if not os.path.isdir(folder):
                    raise SystemExit(
                        f"No export of {name} in {out}: run `python benchmarks/serving_speed.py "
                        f"export --out {out}` first (in the test environment)."
                    )
                make = {
                    "ort": lambda: _ort_runner(folder, device),
                    "saved_model": lambda: _saved_model_runner(folder, name),
                    "saved_model_xla": lambda: _saved_model_runner(folder, f"{name}_xla"),
                    "keras": lambda: _keras_runner(folder),
                }[runtime]
                runners[(runtime, name)] = make()
    except ImportError as error:
        hint = (
            "the Optimum environment: see benchmarks/optimum_gpt2.py"
            if "optimum" in str(error) or "torch" in str(error)
            else "the test environment: make setup"
        )
        print(f"serving_speed: {error} (install {hint})", file=sys.stderr)
        raise SystemExit(2) from None
    return runners


def time_runtimes(out, runtimes, models, repeats, device="cpu"):
    runners = _runners(out, runtimes, models, device)
    stamp = {
        "date": datetime.date.today().isoformat(),
        "machine": _machine(),
        "device": device,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }
    for batch, new_tokens in CELLS:
        samples = {key: [] for key in runners}
        steps = {}
        for key, run in runners.items():  # warm-up: tracing, sessions, XLA
            steps[key] = run(batch, new_tokens)
        for _ in range(repeats):  # interleaved
            for key, run in runners.items():
                start = time.perf_counter()
                run(batch, new_tokens)
                samples[key].append(time.perf_counter() - start)
        per_token = {}
        for (runtime, model), times in samples.items():
            ms_per_step = 1000 * statistics.median(times) / steps[(runtime, model)]
            per_token[(runtime, model)] = ms_per_step / batch
            line = dict(
                runtime=runtime,
                model=model,
                batch=batch,
                new_tokens=new_tokens,
                steps=steps[(runtime, model)],
                repeats=repeats,
                ms_per_step=round(ms_per_step, 3),
                ms_per_token=round(ms_per_step / batch, 3),
                **stamp,
            )
            print(json.dumps(line), flush=True)
        first = next(iter(per_token))
        print(
            json.dumps(
                {
                    "batch": batch,
                    "new_tokens": new_tokens,
                    f"ratio_to_{first[0]}_{first[1]}": {
                        f"{r}_{m}": round(v / per_token[first], 3)
                        for (r, m), v in per_token.items()
                    },
                }
            ),
            flush=True,
        )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    exporting = commands.add_parser("export", help="save and export the random-weight models")
    exporting.add_argument("--out", required=True)
    exporting.add_argument("--models", default=",".join(MODELS))
    exporting.add_argument("--seed", type=int, default=0)
    timing = commands.add_parser("time", help="time the runtimes, interleaved")
    timing.add_argument("--out", required=True)
    timing.add_argument("--runtimes", default="ort,optimum,optimum_bare")
    timing.add_argument("--models", default=",".join(MODELS))
    timing.add_argument("--repeats", type=int, default=5)
    timing.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="ONNX Runtime's provider for OrtGenerator and Optimum",
    )
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if args.command == "export":
        export(args.out, models, args.seed)
        return 0
    runtimes = [r for r in args.runtimes.split(",") if r]
    unknown = sorted(set(runtimes) - set(RUNTIMES))
    if unknown:
        parser.error(f"unknown --runtimes {unknown}; choose from {list(RUNTIMES)}")
    if args.device == "cuda" and {"keras", "saved_model", "saved_model_xla"} & set(runtimes):
        parser.error("--device cuda times the ONNX Runtime runtimes (ort, optimum, optimum_bare)")
    time_runtimes(args.out, runtimes, models, args.repeats, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
