"""Front end of `keras-primer export`: arguments, checks and the export plan.

Standard library only at import time (plus the TF Serving API's protobuf
config, imported where `models.config` is read or merged), so `--help`,
bad arguments and every check that needs no model answer at once, before
TensorFlow is imported and before anything is written. The export itself
is `keras_primer.export.command.run_export(plan)`.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import sys
import zipfile

PROG = "keras-primer export"

# A TF Serving model name is a folder under the model base path, a path
# segment of the REST URL (`/v1/models/NAME:predict`, so no `/` or `:`) and a
# string in `models.config`: letters, digits, `_`, `-` and `.`, starting with a
# letter or digit (so never `.`, `..` or a hidden folder), at most 128 chars.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")

# Import name -> (distribution, extra that installs it), per exported format.
SAVED_MODEL_PACKAGES = {"tensorflow_serving": ("tensorflow-serving-api", "serving")}
ONNX_PACKAGES = {
    "tf2onnx": ("tf2onnx", "onnx"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
}


class ExportError(Exception):
    """An expected export failure: the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """What one export reads and where it writes, checked before any work."""

    model_path: str
    out_dir: str
    name: str
    version: int
    max_new_tokens: int | None = None
    int8: bool = False
    saved_model: bool = True
    onnx: bool = True
    overwrite: bool = False

    @property
    def serving_dir(self) -> str:
        return os.path.join(self.out_dir, "serving")

    @property
    def version_dir(self) -> str:
        return os.path.join(self.serving_dir, self.name, str(self.version))

    @property
    def models_config(self) -> str:
        return os.path.join(self.serving_dir, "models.config")

    @property
    def onnx_dir(self) -> str:
        return os.path.join(self.out_dir, "onnx")

    def argv(self) -> list[str]:
        """The `keras-primer export` arguments that make this plan."""
        argv = [
            self.model_path,
            "--out",
            self.out_dir,
            "--name",
            self.name,
            "--version",
            str(self.version),
        ]
        if self.max_new_tokens is not None:
            argv += ["--max-new-tokens", str(self.max_new_tokens)]
        flags = {
            "--int8": self.int8,
            "--no-onnx": not self.onnx,
            "--no-saved-model": not self.saved_model,
            "--overwrite": self.overwrite,
        }
        return argv + [flag for flag, on in flags.items() if on]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `keras-primer export`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Export a .keras causal LM (trained on any backend) to a TF Serving SavedModel "
            "(OUT/serving/NAME/VERSION, OUT/serving/models.config) and to ONNX (OUT/onnx). "
            "Everything is written into a temporary folder inside OUT and moved into place "
            "only when every file is written and checked."
        ),
    )
    parser.add_argument("model", help="path to the .keras file")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--name",
        default=None,
        help="TF Serving model name: letters, digits, '_', '-', '.', starting "
        "with a letter or digit (default: from the file name)",
    )
    parser.add_argument(
        "--version", type=int, default=1, help="TF Serving version, >= 1 (default 1)"
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="new tokens of the `generate` signature (default: 32, or fewer "
        "when the model's max_sequence_length needs it)",
    )
    parser.add_argument("--int8", action="store_true", help="also write int8-quantized ONNX models")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX files")
    parser.add_argument("--no-saved-model", action="store_true", help="skip the SavedModel")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing OUT/serving/NAME/VERSION and OUT/onnx",
    )
    parser.add_argument("--json", action="store_true", help="print the written paths as JSON")
    parser.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up logs")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    return parser


def default_name(model_path: str) -> str:
    """A valid model name from a file name.

    >>> default_name("runs/demo/model.keras")
    'model'
    >>> default_name("/tmp/.my run (2).keras")
    'my_run_2'
    """
    stem = os.path.splitext(os.path.basename(model_path))[0]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_.-")[:128]
    return name or "model"


def validate_name(name: str) -> str:
    """Returns `name` if TF Serving accepts it as a model name, else raises `ExportError`.

    >>> validate_name("primer_ez-v2.1")
    'primer_ez-v2.1'
    >>> validate_name("../../x")
    Traceback (most recent call last):
    ...
    keras_primer_runtime.export_cli.ExportError: --name '../../x' is not a TF Serving model name: use letters, digits, '_', '-' and '.', starting with a letter or digit, at most 128 characters (e.g. --name x).
    """
    if not NAME_PATTERN.fullmatch(name):
        suggestion = default_name(name + ".keras")
        raise ExportError(
            f"--name {name!r} is not a TF Serving model name: use letters, digits, '_', '-' and "
            f"'.', starting with a letter or digit, at most 128 characters (e.g. --name {suggestion})."
        )
    return name


def missing_packages(saved_model: bool, onnx: bool) -> list[tuple[str, str]]:
    """`(distribution, extra)` of every optional package the export needs and lacks."""
    needed = dict(SAVED_MODEL_PACKAGES if saved_model else {})
    needed.update(ONNX_PACKAGES if onnx else {})
    missing = []
    for module, package in needed.items():
        if module == "onnxruntime" and importlib.util.find_spec("onnxruntime") is None:
            missing.append(package)  # onnxruntime-gpu provides the same module
        elif importlib.util.find_spec(module) is None:
            missing.append(package)
    return missing


def _inside(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return os.path.commonpath([path, root]) == root and path != root


def _non_empty_dir(path: str) -> bool:
    return os.path.isdir(path) and bool(os.listdir(path))


def plan_export(
    model_path: str,
    out_dir: str,
    name: str | None = None,
    version: int = 1,
    max_new_tokens: int | None = None,
    int8: bool = False,
    saved_model: bool = True,
    onnx: bool = True,
    overwrite: bool = False,
) -> ExportPlan:
    """Checks everything that can be checked without loading the model.

    Raises `ExportError` (one line: the file and the fix) on a missing or
    non-`.keras` model file, a bad name or version, an output that exists
    (without `overwrite`), an unreadable `models.config`, or a missing
    optional package. Nothing is written.
    """
    if not saved_model and not onnx:
        raise ExportError(
            "--no-saved-model and --no-onnx leave nothing to export: drop one of them."
        )
    if not os.path.isfile(model_path):
        raise ExportError(
            f"No model file at {model_path}: pass the .keras file written by "
            "`keras-primer train` (OUT/model.keras) or by `model.save(...)`."
        )
    if not zipfile.is_zipfile(model_path):
        raise ExportError(
            f"{model_path} is not a .keras file (not a zip archive): pass a file "
            "written by `keras-primer train` or `model.save('....keras')`."
        )
    name = validate_name(name if name is not None else default_name(model_path))
    if isinstance(version, bool) or int(version) != version or version < 1:
        raise ExportError(
            f"--version must be an integer >= 1 (a TF Serving version folder). Received: {version}"
        )
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ExportError(f"--max-new-tokens must be at least 1. Received: {max_new_tokens}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"--out {out_dir} is a file: pass a folder.")
    plan = ExportPlan(
        os.path.abspath(model_path),
        os.path.abspath(out_dir),
        name,
        int(version),
        max_new_tokens,
        bool(int8),
        bool(saved_model),
        bool(onnx),
        bool(overwrite),
    )
    for path in (plan.version_dir, plan.models_config, plan.onnx_dir):
        if not _inside(path, plan.out_dir):  # e.g. a symlinked `serving` folder
            raise ExportError(
                f"{path} resolves outside --out {plan.out_dir}: remove the link "
                "or pick another --out."
            )
    if saved_model and os.path.lexists(plan.version_dir) and not overwrite:
        raise ExportError(
            f"{plan.version_dir} already exists: pass --overwrite to replace it, "
            "or pick another --version."
        )
    if onnx and _non_empty_dir(plan.onnx_dir) and not overwrite:
        raise ExportError(
            f"{plan.onnx_dir} already holds an ONNX export: pass --overwrite to "
            "replace it, --no-onnx to keep it, or another --out."
        )
    if missing := missing_packages(saved_model, onnx):
        packages = ", ".join(sorted({p for p, _ in missing}))
        extras = ",".join(sorted({e for _, e in missing}))
        skip = " or ".join(
            flag
            for flag, extra in (("--no-saved-model", "serving"), ("--no-onnx", "onnx"))
            if any(e == extra for _, e in missing)
        )
        raise ExportError(
            f"{packages} not installed: pip install 'keras-primer[{extras}]' "
            f"(or pass {skip}). Nothing was written."
        )
    if saved_model and os.path.exists(plan.models_config):
        with open(plan.models_config) as f:
            read_models_config(f.read(), plan.models_config)
    return plan


def read_models_config(text: str, path: str = "models.config"):
    """Parses a TF Serving `--model_config_file` text proto (a `ModelServerConfig`)."""
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    config = model_server_config_pb2.ModelServerConfig()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as error:
        raise ExportError(
            f"{path} is not a TF Serving model config ({error}): fix it or move "
            "it away, then export again."
        ) from None
    return config


def merge_models_config(existing: str | None, new: str, path: str = "models.config") -> str:
    """`existing` with each model of `new` added, one entry per model name.

    A model that already has an entry keeps it as it is (its base path, and
    its version policy if one was written), so exporting another version
    adds nothing and older versions stay served as before. Names and paths
    are written by protobuf, which escapes them.
    """
    from google.protobuf import text_format

    merged = read_models_config(existing or "", path)
    added = read_models_config(new, path)
    names = {entry.name for entry in merged.model_config_list.config}
    for entry in added.model_config_list.config:
        if entry.name not in names:
            merged.model_config_list.config.add().CopyFrom(entry)
            names.add(entry.name)
    return text_format.MessageToString(merged)


def report(written: dict) -> str:
    """Human-readable lines for the paths an export wrote."""
    lines = []
    if "saved_model" in written:
        lines.append(f"SavedModel (TF Serving layout): {written['saved_model']}")
        lines.append(f"TF Serving config:              {written['models_config']}")
    for key, path in written.get("onnx", {}).items():
        lines.append(f"ONNX {key + ':':<26} {path}")
    return "\n".join(lines)


def error_line(error: BaseException) -> str:
    """One line for an expected failure: its message, and the fix where it has none.

    >>> error_line(PermissionError(13, "Permission denied", "/srv/models"))
    "[Errno 13] Permission denied: '/srv/models' (check the path, its permissions and free disk space; --debug shows the traceback)"
    """
    message = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, ExportError):
        return message
    if isinstance(error, OSError):
        return f"{message} (check the path, its permissions and free disk space; --debug shows the traceback)"
    return f"{message} (--debug shows the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Entry point of `keras-primer export`; returns the exit status.

    0 on success; 2 on an expected failure (bad argument, missing file or
    package, existing output, I/O error), reported as one line, the
    traceback only with `--debug`.
    """
    args = build_parser().parse_args(argv)
    from keras_primer_runtime.logging_setup import quiet_backend_logs

    quiet_backend_logs(args.verbose)
    try:
        plan = plan_export(
            args.model,
            args.out,
            args.name,
            args.version,
            args.max_new_tokens,
            int8=args.int8,
            saved_model=not args.no_saved_model,
            onnx=not args.no_onnx,
            overwrite=args.overwrite,
        )
        # The export runs under TensorFlow whatever trained the model; choosing it
        # here, before Keras is imported, saves a second interpreter.
        if "keras" not in sys.modules:
            os.environ["KERAS_BACKEND"] = "tensorflow"
        from keras_primer.export.command import run_export

        written = run_export(plan)
    except (ExportError, OSError, ValueError, RuntimeError, ImportError) as error:
        if args.debug:
            raise
        print(f"{PROG}: error: {error_line(error)}", file=sys.stderr)
        return 2
    if args.json:
        import json

        print(json.dumps(written))
    else:
        print(report(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
