"""The `keras-primer` command: dispatches to `train` and `export` (stdlib only).

Nothing here imports Keras, TensorFlow, JAX or PyTorch, so `keras-primer
--help` and each subcommand's `--help` answer at once; the subcommand
imports its framework only once its arguments are parsed. Backend logs are
silenced first (before any framework import) unless `--verbose` is given.
"""

from __future__ import annotations

import sys

from keras_primer_cli.errors import EXIT_INTERRUPTED, NOTHING_WRITTEN, interrupted_line
from keras_primer_cli.logging_setup import quiet_backend_logs

USAGE = """usage: keras-primer [--verbose] {train,export} ...

Primer EZ and Feedback Transformer language models for every Keras backend.

commands:
  train    train a model on a text corpus      (keras-primer train --help)
  export   export a .keras model to TF Serving and ONNX
                                                (keras-primer export --help)

options:
  -h, --help   show this message and exit
  --version    print the keras-primer version and exit
  --verbose    keep TensorFlow / JAX / absl start-up logs (silenced by default)
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("keras-primer")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    """Runs `keras-primer ARGV`; returns the exit status (2 for usage errors).

    Example:

    >>> from keras_primer_cli.main import main
    >>> main(["--help"])  # doctest: +ELLIPSIS
    usage: keras-primer [--verbose] {train,export} ...
    ...
    0
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = False
    while argv and argv[0] == "--verbose":
        verbose = True
        argv.pop(0)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if argv[0] == "--version":
        print(f"keras-primer {_version()}")
        return 0
    command, rest = argv[0], argv[1:]
    quiet_backend_logs(verbose)
    if command in ("train", "export"):
        try:
            if command == "train":
                from keras_primer_cli.train import main as command_main
            else:
                from keras_primer_cli.export import main as command_main
        except KeyboardInterrupt:  # the command's own handler is not in place yet
            print(interrupted_line(f"keras-primer {command}", NOTHING_WRITTEN), file=sys.stderr)
            return EXIT_INTERRUPTED
        return command_main(rest)
    print(
        f"keras-primer: error: unknown command {command!r} (choose train or export)\n",
        file=sys.stderr,
    )
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
