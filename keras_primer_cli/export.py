"""`keras-primer export`: parse and check every option, then export under TensorFlow.

`--help`, bad arguments and every check that needs no model answer before
TensorFlow is imported (`keras_primer_cli.export_options`). The library is
imported once, late: `keras_primer.export.command.run_export`, the entry
function, which runs the export under `--out`'s lock.

    python -m keras_primer_cli.export runs/x/model.keras --out exports/x
"""

from __future__ import annotations

import json
import os
import sys

from keras_primer_cli.errors import (
    EXIT_EXPECTED_FAILURE,
    EXIT_INTERRUPTED,
    NOTHING_WRITTEN,
    ExportError,
    error_line,
    interrupted_line,
    printable,
)
from keras_primer_cli.export_options import PROG, build_parser, check_options, options_from_args
from keras_primer_cli.interrupts import INTERRUPTS
from keras_primer_cli.logging_setup import quiet_backend_logs

# Failures reported in one line (ExportError: the message names the file and the fix).
EXPECTED = (ExportError, OSError, ValueError, RuntimeError, ImportError)


def report(written: dict) -> str:
    """Human-readable lines for the paths an export wrote."""
    lines = []
    if "saved_model" in written:
        lines.append(f"SavedModel (TF Serving layout): {written['saved_model']}")
        lines.append(f"TF Serving config:              {written['models_config']}")
    for key, path in written.get("onnx", {}).items():
        lines.append(f"ONNX {key + ':':<26} {path}")
    return printable("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `keras-primer export`; returns the exit status.

    0 on success; 2 on an expected failure (bad argument, missing file or
    package, existing output, I/O error), reported as one line, the
    traceback only with `--debug`; 130 when Ctrl-C stopped it, with `--out`
    as it was (the moves into place are all or nothing; a Ctrl-C after them
    changes nothing).
    """
    with INTERRUPTS.installed():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    quiet_backend_logs(args.verbose)
    try:
        options = check_options(options_from_args(args))
        # The export runs under TensorFlow whatever trained the model; choosing it
        # here, before Keras is imported, saves a second interpreter.
        if "keras" not in sys.modules:
            os.environ["KERAS_BACKEND"] = "tensorflow"
        from keras_primer.export.command import run_export  # the one late import

        written = run_export(options)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(interrupted_line(PROG, NOTHING_WRITTEN), file=sys.stderr)
        return EXIT_INTERRUPTED
    except EXPECTED as error:
        if args.debug:
            raise
        if args.result_file:
            _write_result(args.result_file, {"error": error_line(error), "expected": True})
        print(error_line(error, PROG), file=sys.stderr)
        return EXIT_EXPECTED_FAILURE
    if args.result_file:
        _write_result(args.result_file, {"written": written})
    if args.json:
        print(json.dumps(written))
    else:
        print(report(written))
    return 0


def _write_result(path: str, result: dict) -> None:
    with open(path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    sys.exit(main())
