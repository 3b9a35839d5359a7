"""`keras-primer train` on the library side: `run(config)`, the entry function.

The front end (`keras_primer_cli.train`) parses and checks every
flag without a framework, then imports `run` (its one import of the
library) and calls it.
"""

from __future__ import annotations

import gc
import os
import sys

from keras_primer.training.driver import train
from keras_primer_cli.errors import (
    EXIT_EXPECTED_FAILURE,
    EXIT_INTERRUPTED,
    EXPECTED_ERRORS,
    error_line,
    interrupted_line,
    printable,
)
from keras_primer_cli.run_config import TRAIN_PROG, RunConfig

__all__ = ["run"]


def run(config: RunConfig) -> int:
    """Trains `config`, prints the outcome and returns the exit status.

    0: trained; 2: an expected failure (one line on stderr, `config.debug`
    raises it instead); 130: interrupted (rerun the same command to resume).
    """
    summary = None
    try:
        summary = train(config)
    except KeyboardInterrupt:
        if config.debug:
            raise
    except EXPECTED_ERRORS as error:
        if config.debug:
            raise
        print(error_line(error, TRAIN_PROG), file=sys.stderr)
        return EXIT_EXPECTED_FAILURE
    if summary is None:
        # Out of the `except` block (its traceback holds the stopped fit's data
        # iterator), free that iterator now: TensorFlow warns on stderr about
        # one that is left to finalize after the interpreter has shut down.
        gc.collect()
        print(
            interrupted_line(
                TRAIN_PROG, "the last checkpoint is kept; rerun the same command to resume"
            ),
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    speed = summary["tokens_per_second"]
    print(
        f"\n{summary['model']}: {summary['steps']} steps, val loss "
        f"{summary['val_loss']:.4f}, val bits/char {summary['val_bits_per_char']:.3f}, "
        + (f"{speed:.0f} tokens/s" if speed is not None else "tokens/s not measured")
        + f", {summary['wall_time_s']:.1f} s\n"
        f"Outputs in {printable(os.path.abspath(config.out))} (summary.json, model.keras, best.keras, "
        "history.csv, samples.txt)."
    )
    for prompt, text in summary["samples"].items():
        print(f"\n--- {prompt!r} ---\n{text}")
    return 0
