"""`keras-primer train`: parse and check every flag, then import Keras and train.

`--help` and wrong flags are answered before any framework is imported (no
TensorFlow, JAX or PyTorch start-up), and `--backend` is put into
`KERAS_BACKEND` before Keras is first imported: one interpreter, no restart.
Expected failures (bad settings, missing or corrupt files, a missing
optional package, a locked `--out`, a NaN loss) print one line and exit 2;
`--debug` shows the traceback instead.

The library is imported once, late: `keras_primer.training.command.run`,
the entry function. Nothing else here imports `keras_primer`.

    python -m keras_primer_cli.train --out runs/x --steps 20
"""

from __future__ import annotations

import importlib.util
import os
import sys

from keras_primer_cli.errors import (
    EXIT_EXPECTED_FAILURE,
    EXIT_INTERRUPTED,
    EXPECTED_ERRORS,
    NOTHING_WRITTEN,
    ConfigError,
    error_line,
    interrupted_line,
)
from keras_primer_cli.interrupts import INTERRUPTS
from keras_primer_cli.logging_setup import quiet_backend_logs
from keras_primer_cli.run_config import BACKENDS, TRAIN_PROG, build_train_parser, config_from_args

PROG = TRAIN_PROG
# Backends installed by an extra of keras-primer (TensorFlow is a dependency).
BACKEND_EXTRAS = ("jax", "torch")


def _use_backend(backend: str | None) -> None:
    """Makes Keras start on `backend` (it must not be imported yet with another),
    else on `$KERAS_BACKEND`; checks the choice and that its package is installed.

    Raises:
        ConfigError: `$KERAS_BACKEND` names no backend this package runs on,
            or the backend's package is missing (with the pip command).
    """
    if not backend:
        named = os.environ.get("KERAS_BACKEND")
        if named is None or "keras" in sys.modules:
            return
        if named not in BACKENDS:
            raise ConfigError(
                f"KERAS_BACKEND={named!r} is not a Keras backend keras-primer runs on: set it "
                f"to one of {', '.join(BACKENDS)} (or unset it), or pass --backend."
            )
        _check_installed(named, f"KERAS_BACKEND={named}")
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
    _check_installed(backend, f"--backend {backend}")
    os.environ["KERAS_BACKEND"] = backend


def _check_installed(backend: str, chosen_by: str) -> None:
    """Raises `ConfigError` with the pip command when `backend`'s package is missing."""
    if importlib.util.find_spec(backend) is not None:  # the package is named as the backend
        return
    extra = f"keras-primer[{backend}]" if backend in BACKEND_EXTRAS else "keras-primer"
    raise ConfigError(
        f"{chosen_by} needs the `{backend}` package, which is not installed: "
        f'pip install "{extra}", or choose another backend.'
    )


def main(argv: list[str] | None = None) -> int:
    """Runs `keras-primer train` with `argv`; returns the exit status.

    0: trained; 2: an expected failure (one line on stderr); 130: interrupted
    (rerun the same command to resume). argparse exits 2 for unknown flags.
    """
    with INTERRUPTS.installed():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_train_parser(PROG)
    config = config_from_args(parser.parse_args(argv))
    try:
        config.validate()
        _use_backend(config.backend)
        quiet_backend_logs(verbose=config.verbose >= 2)
        # The one import of the library (the entry function): Keras starts here.
        from keras_primer.training.command import run
    except KeyboardInterrupt:
        if config.debug:
            raise
        print(interrupted_line(PROG, NOTHING_WRITTEN), file=sys.stderr)
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as error:
        if config.debug:
            raise
        print(error_line(error, PROG), file=sys.stderr)
        return EXIT_EXPECTED_FAILURE
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
