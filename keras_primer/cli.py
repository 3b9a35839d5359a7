"""`keras-primer` console command: `train` and `export` subcommands."""

import sys


USAGE = """usage: keras-primer {train,export} ...

  train   train a model on a text corpus (keras-primer train --help)
  export  export a .keras model to TF Serving and ONNX (keras-primer export --help)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        from keras_primer.training.command import main as train_main

        return train_main(rest)
    if command == "export":
        from keras_primer.export.command import main as export_main

        return export_main(rest)
    print(f"keras-primer: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
