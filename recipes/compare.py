"""Primer EZ vs the Transformer baseline (and Feedback) with the same budget and seed.

    python -m recipes.compare --out runs/compare --quick          # minutes, CPU
    python -m recipes.compare --out runs/compare --preset shakespeare_char   # GPU

Writes a table (comparison.md/.csv/.json), a plot of validation loss vs steps
and vs wall-clock (comparison.png), and the ratio of steps Primer EZ needs to
reach the baseline's final validation loss.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--data", default=None)
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny preset, 100 steps")
    parser.add_argument("--models", default="primer_ez,transformer,feedback")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-interval", type=int, default=None, help="steps between evaluations")
    parser.add_argument("--eval-windows", type=int, default=None,
                        help="validation windows per evaluation (more: a less noisy curve)")
    parser.add_argument("--backend", default=None, choices=("tensorflow", "jax", "torch"))
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the table and plot from the finished runs in --out")
    args = parser.parse_args(argv)

    if args.backend:  # before anything imports Keras
        os.environ["KERAS_BACKEND"] = args.backend
    from keras_primer.training import RunConfig
    from keras_primer.training.compare import compare, load_summaries, report
    from keras_primer.training.presets import get_preset

    preset = "tiny" if args.quick else args.preset
    base = RunConfig(
        out=args.out,
        data=args.data,
        preset=get_preset(preset, eval_windows=args.eval_windows) if args.eval_windows else preset,
        steps=args.steps or (100 if args.quick else None),
        eval_interval=args.eval_interval or (25 if args.quick else None),
        seed=args.seed,
        sample_tokens=100,
        verbose=2,
    )
    models = tuple(args.models.split(","))
    try:
        if args.report_only:
            out = os.path.abspath(args.out)
            report(load_summaries(out, models), out)
        else:
            compare(base, models)
    except ValueError as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    print(open(os.path.join(os.path.abspath(args.out), "comparison.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
