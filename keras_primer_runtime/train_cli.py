"""`keras-primer train`: parse and check every flag, then import Keras and train.

`--help` and wrong flags are answered before any framework is imported (no
TensorFlow, JAX or PyTorch start-up), and `--backend` is put into
`KERAS_BACKEND` before Keras is first imported: one interpreter, no restart.
Expected failures (bad settings, missing or corrupt files, a missing
optional package, a locked `--out`, a NaN loss) print one line and exit 2;
`--debug` shows the traceback instead.

    python -m keras_primer_runtime.train_cli --out runs/x --steps 20
"""

from __future__ import annotations

import os
import sys

from keras_primer_runtime.logging_setup import quiet_backend_logs
from keras_primer_runtime.run_config import build_train_parser, config_from_args

PROG = "keras-primer train"


def _use_backend(backend: str | None) -> None:
    """Makes Keras start on `backend` (it must not be imported yet with another)."""
    if not backend:
        return
    if "keras" in sys.modules:
        import keras

        running = keras.backend.backend()
        if running != backend:
            raise ValueError(
                f"Keras is already running on {running!r} in this process and cannot switch "
                f"to {backend!r}: run the command in a fresh process, or set "
                f"KERAS_BACKEND={backend} before importing Keras."
            )
        return
    os.environ["KERAS_BACKEND"] = backend


def _expected_errors() -> tuple[type[BaseException], ...]:
    # ValueError covers bad settings, data and checkpoint errors (their classes
    # derive from it); the others are I/O and missing optional packages.
    return (ValueError, OSError, ImportError, RuntimeError)


def main(argv: list[str] | None = None) -> int:
    """Runs `keras-primer train` with `argv`; returns the exit status.

    0: trained; 2: an expected failure (one line on stderr); 130: interrupted
    (rerun the same command to resume). argparse exits 2 for unknown flags.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_train_parser(PROG)
    args = parser.parse_args(argv)
    config = config_from_args(args)
    try:
        config.validate()
        _use_backend(config.backend)
        quiet_backend_logs(verbose=config.verbose >= 2)
        from keras_primer.training.driver import train

        summary = train(config)
    except KeyboardInterrupt:
        print(
            f"{PROG}: interrupted; rerun the same command to resume from the last checkpoint.",
            file=sys.stderr,
        )
        return 130
    except _expected_errors() as e:
        if config.debug:
            raise
        message = " ".join(str(e).split()) or type(e).__name__
        hint = "" if isinstance(e, ValueError) else " (--debug shows the traceback)"
        print(f"{PROG}: error: {message}{hint}", file=sys.stderr)
        return 2
    print(
        f"\n{summary['model']}: {summary['steps']} steps, val loss "
        f"{summary['val_loss']:.4f}, val bits/char {summary['val_bits_per_char']:.3f}, "
        f"{summary['tokens_per_second']:.0f} tokens/s, {summary['wall_time_s']:.1f} s\n"
        f"Outputs in {os.path.abspath(config.out)} (summary.json, model.keras, best.keras, "
        "history.csv, samples.txt)."
    )
    for prompt, text in summary["samples"].items():
        print(f"\n--- {prompt!r} ---\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
