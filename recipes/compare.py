"""Time to quality: Primer EZ, our Transformer and Feedback against keras-hub GPT-2.

    python -m recipes.compare --out runs/compare --quick          # minutes, CPU
    python -m recipes.compare --out runs/compare --preset shakespeare_char   # GPU
    python -m recipes.compare --out runs/seeds --models gpt2,primer_ez,transformer \
        --seeds 0,1,2,3,4 --steps 600 --eval-interval 50             # error bars
    python -m recipes.compare --out runs/spm --tokenizer sentencepiece --seeds 0,1,2
    bash benchmarks/gpu_run.sh        # the whole GPU run on JAX (train, MFU, ONNX on CUDA)

Takes every `keras-primer train` flag (the base run; `--model` is replaced
by `--models`, `--seed` by `--seeds` when given) plus the few below. `gpt2`
is keras-hub's `GPT2CausalLM` of the preset's size with random weights
(nothing is downloaded); every model trains on the same batches, tokenizer
(one SentencePiece model for all runs), optimizer, schedule and precision.
Writes a table (comparison.md/.csv/.json), a plot of validation loss vs
steps and vs wall-clock (comparison.png), and for every model the steps and
seconds it needs to reach GPT-2's final validation loss (the Transformer's
without `gpt2`). With `--seeds`, each model trains once per seed
(<out>/<model>/seed-<s>/) and the report has every seed's figures and their
mean, std, min and max.
"""

from __future__ import annotations

import dataclasses
import os
import sys

from keras_primer_cli.logging_setup import quiet_backend_logs
from keras_primer_cli.run_config import build_train_parser, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = build_train_parser(prog="python -m recipes.compare")
    parser.description = __doc__.splitlines()[0]
    parser.set_defaults(preset="cpu", sample_tokens=100, verbose=2)
    parser.add_argument(
        "--models",
        default="gpt2,primer_ez,transformer,feedback",
        help="comma-separated: gpt2 (keras-hub's GPT-2, the target), primer_ez, "
        "transformer, feedback, feedback_primer_ez (Feedback with MDHA and squared ReLU)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny preset, 100 steps")
    parser.add_argument(
        "--eval-windows",
        type=int,
        default=None,
        help="validation windows per evaluation (more: a less noisy curve)",
    )
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="learning-rate warmup steps (default: the preset's)",
    )
    parser.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds (e.g. 0,1,2): each model trains once per seed, "
        "in <out>/<model>/seed-<s>/, and the report gives the spread over seeds "
        "(replaces --seed)",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the table and plot from the finished runs in --out",
    )
    args = parser.parse_args(argv)
    base = config_from_args(args)
    if args.quick:
        base = dataclasses.replace(
            base, preset="tiny", steps=base.steps or 100, eval_interval=base.eval_interval or 25
        )
    try:
        base.validate()
        if base.backend:  # before anything imports Keras
            os.environ["KERAS_BACKEND"] = base.backend
        quiet_backend_logs(base.verbose >= 2)
        from keras_primer.training.compare import check_models, compare, load_summaries
        from keras_primer.training.compare_report import report, report_seeds
        from keras_primer_cli.presets import get_preset

        if args.warmup_steps is not None and args.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be 0 or more. Received: {args.warmup_steps}.")
        if args.eval_windows or args.warmup_steps is not None:
            preset = get_preset(
                base.preset, eval_windows=args.eval_windows, warmup_steps=args.warmup_steps
            )
            base = dataclasses.replace(base, preset=preset)
        models = check_models(args.models.split(","))
        seeds = _parse_seeds(args.seeds)
        out = os.path.abspath(base.out)
        if args.report_only and seeds is not None:
            report_seeds(load_summaries(out, models, seeds), out)
        elif args.report_only:
            report(load_summaries(out, models), out)
        else:
            compare(base, models, seeds=seeds)
    except ValueError as e:
        if base.debug:
            raise
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    with open(os.path.join(out, "comparison.md")) as f:
        print(f.read())
    return 0


def _parse_seeds(text: str | None) -> tuple[int, ...] | None:
    """`"0,1,2"` -> `(0, 1, 2)`; None stays None (one seed: `--seed`).

    Raises:
        ValueError: Not a comma-separated list of integers.
    """
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"--seeds must be comma-separated integers, e.g. 0,1,2. Received: {text!r}."
        ) from None


if __name__ == "__main__":
    sys.exit(main())
