"""`keras-primer export` declared once: options, checks, parser, `models.config`.

`ExportOptions` declares every option of an export once; the argparse
parser, the subprocess arguments and the signature of
`keras_primer.export.export_model` derive from it. Standard library only
at import time (plus the TF Serving API's protobuf config, imported where
`models.config` is read or merged), so `--help`, bad arguments and every
check of the values answer at once, before TensorFlow is imported. The
command itself is `keras_primer_cli.export`; the library's export
(`keras_primer.export.command.run_export`) takes the `--out` lock
(`keras_primer_cli.folder_lock`) and, under it, checks the existing outputs
once (`check_outputs`), writes everything into a temporary folder and moves
it into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import zipfile

from keras_primer_cli.errors import ExportError
from keras_primer_cli.ownership import MODELS_CONFIG, ONNX_CONFIG_FILE, ONNX_DIR, SERVING_DIR
from keras_primer_runtime.serving_client import MODEL_NAME_PATTERN

PROG = "keras-primer export"

# Import name -> (distribution, extra that installs it), per exported format.
SAVED_MODEL_PACKAGES = {"tensorflow_serving": ("tensorflow-serving-api", "serving")}
ONNX_PACKAGES = {
    "tf2onnx": ("tf2onnx", "onnx"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnxruntime", "onnx"),
}

INT64_MAX = 2**63 - 1  # TF Serving reads version folders as int64
INT32_MAX = 2**31 - 1  # the `generate` signatures take int32 lengths
# What marks a folder as written by an export, so that `--overwrite` may replace it.
SAVED_MODEL_FILE = "saved_model.pb"


def _option(default, help: str, flag: str | None = None, **argparse_kwargs):
    """A field of `ExportOptions`: default, help text and `keras-primer export` flag."""
    metadata = {"help": help, "flag": flag, "argparse": argparse_kwargs}
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class ExportOptions:
    """Every option of one export, declared once.

    The `keras-primer export` parser (`build_parser`), the subprocess
    arguments (`argv`) and the signature of `keras_primer.export.export_model`
    derive from these fields; `check_options` checks their values.

    >>> ExportOptions("m.keras", "out", version=2, onnx=False).argv()
    ['m.keras', '--out', 'out', '--version', '2', '--no-onnx']
    """

    model_path: str = _option(None, "path to the .keras file", flag="model")
    out_dir: str = _option(None, "output folder", flag="--out", required=True)
    name: str | None = _option(
        None,
        "TF Serving model name: letters, digits, '_', '-', '.', starting with a letter or "
        "digit (default: from the file name)",
    )
    version: int = _option(1, "TF Serving version, 1 to 2**63 - 1 (default 1)", type=int)
    max_new_tokens: int | None = _option(
        None,
        "new tokens of the `generate` signature (default: 32, or half of what the model's "
        "max_sequence_length leaves after the start token, so that a prompt fits)",
        type=int,
    )
    int8: bool = _option(False, "also write int8-quantized ONNX models", action="store_true")
    xla: bool = _option(
        False,
        "compile the SavedModel's decoding loop with XLA, as Keras generate does: faster on "
        "a CPU, but TF Serving must run with --xla_cpu_compilation_enabled=true",
        action="store_true",
    )
    saved_model: bool = _option(
        True, "skip the SavedModel", flag="--no-saved-model", action="store_false"
    )
    onnx: bool = _option(True, "skip the ONNX files", flag="--no-onnx", action="store_false")
    overwrite: bool = _option(
        False, "replace an existing OUT/serving/NAME/VERSION and OUT/onnx", action="store_true"
    )
    verbose: bool = _option(
        False,
        "keep the logs and warnings of TensorFlow, Keras and ONNX Runtime",
        action="store_true",
    )

    @staticmethod
    def flag(name: str) -> str:
        """The command-line flag of field `name` (`out_dir` -> `--out`).

        >>> ExportOptions.flag("max_new_tokens")
        '--max-new-tokens'
        """
        field = ExportOptions.__dataclass_fields__[name]
        return field.metadata["flag"] or "--" + name.replace("_", "-")

    @property
    def serving_dir(self) -> str:
        return os.path.join(self.out_dir, SERVING_DIR)

    @property
    def version_dir(self) -> str:
        return os.path.join(self.serving_dir, self.name, str(self.version))

    @property
    def models_config(self) -> str:
        return os.path.join(self.serving_dir, MODELS_CONFIG)

    @property
    def onnx_dir(self) -> str:
        return os.path.join(self.out_dir, ONNX_DIR)

    def argv(self) -> list[str]:
        """The `keras-primer export` arguments that give these options."""
        argv = []
        for field in dataclasses.fields(self):
            value, flag = getattr(self, field.name), self.flag(field.name)
            action = field.metadata["argparse"].get("action")
            if not flag.startswith("-"):
                argv.append(str(value))
            elif action == "store_true":
                argv += [flag] if value else []
            elif action == "store_false":
                argv += [] if value else [flag]
            elif value is not None and value != field.default:
                argv += [flag, str(value)]
        return argv


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `keras-primer export`, derived from `ExportOptions`."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description=(
            "Export a .keras causal LM (trained on any backend) to a TF Serving SavedModel "
            "(OUT/serving/NAME/VERSION, OUT/serving/models.config) and to ONNX (OUT/onnx). "
            "One export writes into OUT at a time (OUT/.lock; a second one waits); everything "
            "is written into a temporary folder inside OUT, its warmup requests replayed, and "
            "moved into place only when every file is written and checked."
        ),
    )
    for field in dataclasses.fields(ExportOptions):
        flag = ExportOptions.flag(field.name)
        kwargs = dict(field.metadata["argparse"], help=field.metadata["help"])
        if flag.startswith("-"):
            kwargs.update(dest=field.name, default=field.default)
        parser.add_argument(flag, **kwargs)
    # Flags of the command only (how it reports), not options of an export.
    parser.add_argument("--json", action="store_true", help="print the written paths as JSON")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    # `export_model`'s subprocess: the result (or the ExportError) as JSON in this file.
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    return parser


def options_from_args(args: argparse.Namespace) -> ExportOptions:
    """The `ExportOptions` of parsed `keras-primer export` arguments."""
    fields = dataclasses.fields(ExportOptions)
    values = {f.name: getattr(args, f.name, None) for f in fields}
    values["model_path"] = args.model
    return ExportOptions(**values)


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
    keras_primer_cli.errors.ExportError: --name '../../x' is not a TF Serving model name: use letters, digits, '_', '-' and '.', starting with a letter or digit, at most 128 characters (e.g. --name x).
    """
    if not MODEL_NAME_PATTERN.fullmatch(name):
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


def check_options(options: ExportOptions) -> ExportOptions:
    """Checks every value that needs no model and no lock; returns them resolved.

    Raises `ExportError` (one line: the flag or file and the fix) on a
    missing or non-`.keras` model file, a bad name, version or
    `--max-new-tokens`, an `--out` that is a file, or a missing optional
    package. Nothing is read but file headers, nothing is written. The
    existing outputs are checked under the `--out` lock (`check_outputs`).
    """
    o = options
    if o.xla and not o.saved_model:
        raise ExportError("--xla compiles the SavedModel's loop: drop --no-saved-model or --xla.")
    if not o.saved_model and not o.onnx:
        raise ExportError(
            "--no-saved-model and --no-onnx leave nothing to export: drop one of them."
        )
    if not isinstance(o.model_path, str) or not os.path.isfile(o.model_path):
        raise ExportError(
            f"No model file at {o.model_path}: pass the .keras file written by "
            "`keras-primer train` (OUT/model.keras) or by `model.save(...)`."
        )
    if not zipfile.is_zipfile(o.model_path):
        raise ExportError(
            f"{o.model_path} is not a .keras file (not a zip archive): pass a file "
            "written by `keras-primer train` or `model.save('....keras')`."
        )
    name = validate_name(o.name if o.name is not None else default_name(o.model_path))
    if not _is_int(o.version) or not 1 <= o.version <= INT64_MAX:
        raise ExportError(
            "--version must be an integer from 1 to 2**63 - 1 (a TF Serving version folder, "
            f"read as int64). Received: {o.version}"
        )
    if o.max_new_tokens is not None and (
        not _is_int(o.max_new_tokens) or not 1 <= o.max_new_tokens <= INT32_MAX
    ):
        raise ExportError(
            f"--max-new-tokens must be an integer from 1 to 2**31 - 1. Received: {o.max_new_tokens}"
        )
    if not isinstance(o.out_dir, str) or not o.out_dir:
        raise ExportError("--out must name a folder.")
    if os.path.exists(o.out_dir) and not os.path.isdir(o.out_dir):
        raise ExportError(f"--out {o.out_dir} is a file: pass a folder.")
    if missing := missing_packages(o.saved_model, o.onnx):
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
    return dataclasses.replace(
        o,
        model_path=os.path.abspath(o.model_path),
        out_dir=os.path.abspath(o.out_dir),
        name=name,
        version=int(o.version),
        **{
            f: bool(getattr(o, f))
            for f in ("int8", "xla", "saved_model", "onnx", "overwrite", "verbose")
        },
    )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_outputs(options: ExportOptions):
    """Checks every path the export will write; call it holding the `--out` lock.

    An export never moves or deletes a path it did not create. Refuses
    (`ExportError`), before any work: a path that resolves outside `--out`;
    a file where a folder goes (`serving/`, `serving/NAME/`, `onnx/`) or a
    folder where `models.config` goes; an existing version or non-empty
    `onnx/` that an export did not write (no `saved_model.pb`, no
    `export_config.json`), or one it wrote without `--overwrite`; an unreadable
    `models.config`. Returns the existing `models.config` as a
    `ModelServerConfig` (empty when there is none), for `add_model`.
    """
    o = options
    for path in (o.version_dir, o.models_config, o.onnx_dir):
        if not _inside(path, o.out_dir):  # e.g. a symlinked `serving` folder
            raise ExportError(
                f"{path} resolves outside --out {o.out_dir}: remove the link or pick another --out."
            )
    if o.saved_model:
        for folder in (o.serving_dir, os.path.dirname(o.version_dir)):
            if os.path.lexists(folder) and not os.path.isdir(folder):
                raise ExportError(
                    f"{folder} is a file, not a folder of exports: move it away or pick another "
                    "--out. Nothing was written."
                )
        if os.path.lexists(o.models_config) and not os.path.isfile(o.models_config):
            raise ExportError(
                f"{o.models_config} is not a file: move it away or pick another --out. "
                "Nothing was written."
            )
        _check_replaceable(o.version_dir, SAVED_MODEL_FILE, o.overwrite, "pick another --version")
    if o.onnx:
        _check_replaceable(o.onnx_dir, ONNX_CONFIG_FILE, o.overwrite, "pass --no-onnx to keep it")
    if not o.saved_model:
        return None
    text = ""
    if os.path.exists(o.models_config):
        with open(o.models_config) as f:
            text = f.read()
    return read_models_config(text, o.models_config)


def _check_replaceable(folder: str, marker: str, overwrite: bool, instead: str) -> None:
    """Refuses to replace `folder` unless it is absent, an empty folder, or
    (with `overwrite`) a folder an export wrote (it holds `marker`)."""
    if not os.path.lexists(folder):
        return
    if not os.path.isdir(folder):
        raise ExportError(
            f"{folder} is a file, not an export folder: move it away or pick another --out "
            "(--overwrite replaces only an export). Nothing was written."
        )
    if not os.listdir(folder):
        return
    if not os.path.isfile(os.path.join(folder, marker)):
        raise ExportError(
            f"{folder} was not written by keras-primer export (it has no {marker}), so "
            "no export replaces it: move it away or pick another --out. Nothing was written."
        )
    if not overwrite:
        raise ExportError(
            f"{folder} already exists: pass --overwrite to replace it, or {instead}. "
            "Nothing was written."
        )


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


def add_model(config, name: str, base_path: str) -> str:
    """`config` (a `ModelServerConfig`) with model `name` added, as text.

    A model that already has an entry keeps it as it is (its base path, and
    its version policy if one was written), so exporting another version
    adds nothing and older versions stay served as before. Names and paths
    are written by protobuf, which escapes them.
    """
    from google.protobuf import text_format

    entries = config.model_config_list.config
    if all(entry.name != name for entry in entries):
        entries.add(name=name, base_path=base_path, model_platform="tensorflow")
    return text_format.MessageToString(config)
