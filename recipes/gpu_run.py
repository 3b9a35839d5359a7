"""The whole GPU run: train, MFU, export, ONNX Runtime on CUDA (each step prints its figures).

    bash benchmarks/gpu_run.sh                        # GPU machine: install, then this
    python -m recipes.gpu_run --cpu-smoke --out /tmp/gpu-smoke   # the same steps, tiny, on a CPU

1. Trains keras-hub GPT-2, Primer EZ and the Transformer baseline at
   nanoGPT's shakespeare_char size on JAX in mixed bfloat16 (`recipes.compare`,
   one seed: steps and wall-clock time to GPT-2's final validation loss).
2. Prints each model's MFU: measured tokens/s x training FLOPs per token
   (`training_flops_per_token`) over the peak, both the bfloat16 matmul peak
   measured here (`matmul_peak_flops`) and the H200's spec sheet.
3. Exports Primer EZ to ONNX (`keras-primer export`, no SavedModel).
4. Generates with ONNX Runtime's CUDA provider (`OrtGenerator`) and prints
   the decoding speed and the text.

`--no-export` stops after step 2: on a machine without TensorFlow and tf2onnx
(`WHEELS=DIR bash benchmarks/gpu_run.sh`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# H200 SXM, dense bfloat16 (NVIDIA's spec sheet; 2x that is with sparsity).
H200_BF16_PEAK = 989e12


def _say(title: str, start: float) -> None:
    print(f"\n=== {title} ({time.perf_counter() - start:.0f} s since start) ===", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.gpu_run", description=__doc__)
    parser.add_argument(
        "--out", default="runs/gpu", help="output folder (a new one: MFU times this run's steps)"
    )
    parser.add_argument("--steps", type=int, default=None, help="default: the preset's")
    parser.add_argument("--data", default=None, help="default: Tiny Shakespeare")
    parser.add_argument("--new-tokens", type=int, default=200, help="ONNX Runtime generation")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny preset, 20 steps, CPU providers: checks every step without a GPU",
    )
    parser.add_argument(
        "--no-export",
        action="store_true",
        help="stop after training and MFU (no TensorFlow or tf2onnx on this machine)",
    )
    args = parser.parse_args(argv)
    smoke = args.cpu_smoke
    os.environ["KERAS_BACKEND"] = "jax"  # before anything imports Keras
    out = os.path.abspath(args.out)
    start = time.perf_counter()

    _say("1. train on JAX, mixed_bfloat16", start)
    from recipes.compare import main as compare

    steps = args.steps or (20 if smoke else None)
    flags = ["--out", os.path.join(out, "compare"), "--models", "gpt2,primer_ez,transformer"]
    flags += ["--backend", "jax", "--precision", "mixed_bfloat16", "--sample-tokens", "0"]
    flags += ["--preset", "tiny" if smoke else "shakespeare_char", "--no-tensorboard"]
    flags += ["--steps", str(steps)] if steps else []
    flags += ["--eval-interval", "10"] if smoke else []
    flags += ["--data", args.data] if args.data else []
    if compare(flags) != 0:
        return 1

    _say("2. MFU", start)
    import jax

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the benchmarks' helpers
    from roofline import matmul_peak_flops, training_flops_per_token

    print(f"JAX devices: {jax.devices()}")
    peak = matmul_peak_flops(size=512 if smoke else 8192, dtype="bfloat16")
    print(f"measured bfloat16 matmul peak: {peak / 1e12:.1f} TFLOP/s")
    for model in ("gpt2", "primer_ez", "transformer"):
        with open(os.path.join(out, "compare", model, "summary.json")) as f:
            s = json.load(f)
        p = s["preset_settings"]
        per_token = training_flops_per_token(
            p["num_layers"],
            p["hidden_dim"],
            p["intermediate_dim"],
            s["tokenizer"]["vocabulary_size"],
            p["sequence_length"],
        )
        if s["tokens_per_second"] is None:  # a finished run resumed: no step was timed
            print(f"{model}: no steps timed in this process (pass a new --out)")
            continue
        achieved = s["tokens_per_second"] * per_token
        print(
            f"{model}: {s['tokens_per_second']:,.0f} tokens/s x {per_token / 1e6:.1f} MFLOP/token"
            f" = {achieved / 1e12:.2f} TFLOP/s; MFU {achieved / peak:.1%} of the measured peak, "
            f"{achieved / H200_BF16_PEAK:.1%} of the H200 spec ({H200_BF16_PEAK / 1e12:.0f} "
            f"TFLOP/s); val loss {s['val_loss']:.4f}, {s['steps']} steps, "
            f"{s['wall_time_s']:.0f} s"
        )

    if args.no_export:
        _say("done (--no-export: no ONNX steps)", start)
        return 0

    _say("3. export Primer EZ to ONNX", start)
    from keras_primer.export.command import export_model

    tick = time.perf_counter()
    export = os.path.join(out, "export")
    model_path = os.path.join(out, "compare", "primer_ez", "model.keras")
    written = export_model(model_path, export, saved_model=False, overwrite=True)
    print(f"exported in {time.perf_counter() - tick:.1f} s: {written}")

    _say("4. generate with ONNX Runtime", start)
    from keras_primer_runtime.ort_generator import OrtGenerator

    providers = ["CPUExecutionProvider"]
    if not smoke:  # asking for CUDA raises when it cannot load: no silent CPU run
        providers.insert(0, "CUDAExecutionProvider")
    generator = OrtGenerator(os.path.join(export, "onnx"), providers=providers)
    new = min(args.new_tokens, 32) if smoke else args.new_tokens
    generator.generate("ROMEO:", max_new_tokens=4)  # warm-up: allocations, kernels
    for batch in (1, 8):
        tick = time.perf_counter()
        texts = generator.generate(["ROMEO:"] * batch, max_new_tokens=new)
        seconds = time.perf_counter() - tick
        print(
            f"{providers[0]}, batch {batch}: {new} new tokens in {seconds:.2f} s, "
            f"{batch * new / seconds:,.0f} tokens/s ({seconds / new * 1e3:.2f} ms/step)"
        )
    print(texts[0])
    _say("done", start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
