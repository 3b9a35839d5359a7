"""`keras-primer train` on the library side: `run(config)`, the entry function.

The front end (`keras_primer_runtime.train_cli`) parses and checks every
flag without a framework, then imports `run` (its one import of the
library) and calls it. `main` and `build_parser` are kept for old imports.
"""

from __future__ import annotations

import os
import sys

from keras_primer.training.driver import train
from keras_primer_runtime.run_config import (
    EXPECTED_ERRORS,
    TRAIN_PROG,
    RunConfig,
    config_from_args,
    error_line,
)
from keras_primer_runtime.run_config import build_train_parser as build_parser

__all__ = ["build_parser", "config_from_args", "main", "run"]


def run(config: RunConfig) -> int:
    """Trains `config`, prints the outcome and returns the exit status.

    0: trained; 2: an expected failure (one line on stderr, `config.debug`
    raises it instead); 130: interrupted (rerun the same command to resume).
    """
    try:
        summary = train(config)
    except KeyboardInterrupt:
        print(
            f"{TRAIN_PROG}: interrupted; rerun the same command to resume from the last "
            "checkpoint.",
            file=sys.stderr,
        )
        return 130
    except EXPECTED_ERRORS as error:
        if config.debug:
            raise
        print(error_line(error), file=sys.stderr)
        return 2
    speed = summary["tokens_per_second"]
    print(
        f"\n{summary['model']}: {summary['steps']} steps, val loss "
        f"{summary['val_loss']:.4f}, val bits/char {summary['val_bits_per_char']:.3f}, "
        + (f"{speed:.0f} tokens/s" if speed is not None else "tokens/s not measured")
        + f", {summary['wall_time_s']:.1f} s\n"
        f"Outputs in {os.path.abspath(config.out)} (summary.json, model.keras, best.keras, "
        "history.csv, samples.txt)."
    )
    for prompt, text in summary["samples"].items():
        print(f"\n--- {prompt!r} ---\n{text}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`keras-primer train ARGV` in a process that has imported Keras already
    (the command itself runs `keras_primer_runtime.train_cli.main`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run(config_from_args(build_parser(TRAIN_PROG).parse_args(argv)))
