"""`make demo`: train a small Primer EZ on Tiny Shakespeare on a CPU, save, export, generate.

    python -m recipes.demo --out runs/demo [--steps N] [--data PATH]

Reads Tiny Shakespeare from `--data`, else `$KERAS_PRIMER_SHAKESPEARE`, else
downloads it. About 3-4 minutes on a 2-core CPU with the default
(TensorFlow) backend; any backend works (`KERAS_BACKEND=jax`).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def export_step(model_path: str, out_dir: str, prompt: str) -> None:
    """Exports the model (TF Serving SavedModel + ONNX) and generates with ONNX Runtime."""
    from keras_primer.export.command import export_model
    from keras_primer_runtime.ort_generator import OrtGenerator

    export_dir = os.path.join(out_dir, "export")
    if os.path.isdir(export_dir):
        import shutil

        shutil.rmtree(export_dir)  # the demo's own output: re-running replaces it
    written = export_model(model_path, export_dir, name="primer_demo")
    print(f"\nSavedModel (TF Serving layout): {written['saved_model']}")
    for key, path in written.get("onnx", {}).items():
        print(f"ONNX {key}: {path}")
    generator = OrtGenerator(os.path.join(export_dir, "onnx"))
    print(f"--- ONNX Runtime (top-k 10) continuation of {prompt!r} ---")
    room = generator.max_sequence_length - len(generator.tokenize(prompt))
    print(
        generator.generate(
            [prompt], max_new_tokens=min(120, room), temperature=1.0, top_k=10, seed=0
        )[0]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--data", default=None, help="local Tiny Shakespeare")
    parser.add_argument("--steps", type=int, default=None, help="default: the `cpu` preset's")
    parser.add_argument("--prompt", default="ROMEO:")
    parser.add_argument("--sample-tokens", type=int, default=300)
    args = parser.parse_args(argv)

    from keras_primer.training import RunConfig, train

    start = time.perf_counter()
    try:
        summary = train(
            RunConfig(
                model="primer_ez",
                preset="cpu",
                out=args.out,
                data=args.data,
                steps=args.steps,
                prompts=[args.prompt],
                sample_tokens=args.sample_tokens,
                verbose=2,
            )
        )
    except ValueError as e:
        print(f"demo: error: {e}", file=sys.stderr)
        return 2
    model_path = summary["files"]["model"]
    speed = summary["tokens_per_second"]  # None if never measured
    print(
        f"\nPrimer EZ, {summary['parameters']:,} parameters, {summary['steps']} steps "
        f"in {time.perf_counter() - start:.0f} s on {summary['backend']}: val loss "
        f"{summary['val_loss']:.3f}, {summary['val_bits_per_char']:.2f} bits/char, "
        + (f"{speed:.0f} tokens/s" if speed is not None else "tokens/s not measured")
        + f".\nSaved {model_path} "
        f"(best: {summary['files']['best_model']}); curve: "
        f"{summary['files']['learning_curve']}.\n"
    )
    print(f"--- generated from {args.prompt!r} ---")
    print(summary["samples"][args.prompt])
    export_step(model_path, args.out, args.prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
