"""`keras-primer export` behind its front end: lock, check, write, replay, move into place.

`keras_primer_cli.export_options` declares the options (`ExportOptions`) and
checks their values (`check_options`); `run_export(options)` then

1. takes `--out`'s lock (`OUT/.lock`, `keras_primer_cli.folder_lock`): a
   second export into the same folder waits for the first, saying so;
2. under it, removes temporary folders left by killed exports and checks
   the existing outputs once (`check_outputs`);
3. writes everything into a temporary folder inside `--out`, replays every
   warmup request against the written SavedModel, and only then renames the
   results into place and merges `models.config` (through its protobuf).

A failed export leaves the output folder as it was.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable

from keras_primer_cli.errors import ExportError, printable
from keras_primer_cli.export_options import (
    ExportOptions,
    add_model,
    check_options,
    check_outputs,
)
from keras_primer_cli.folder_lock import FolderLock
from keras_primer_cli.interrupts import INTERRUPTS
from keras_primer_cli.logging_setup import quiet_native_logs
from keras_primer_cli.ownership import EXPORT_STAGING

#: The default `max_new_tokens` of the `generate` signature, when the model has room.
DEFAULT_MAX_NEW_TOKENS = 32
# How the export's notes to its user start (and its errors: `+ "error:"`).
SAY_PREFIX = "keras-primer export: "


def _backend() -> str:
    import keras

    return keras.backend.backend()


def export_model(model_path: str, out_dir: str, **options) -> dict:
    """Exports a `.keras` causal LM to TF Serving and ONNX; returns the written paths.

    Takes the options of `keras-primer export` as keywords (the fields of
    `keras_primer_cli.export_options.ExportOptions`: `name`, `version`,
    `max_new_tokens`, `int8`, `saved_model`, `onnx`, `overwrite`, `verbose`).
    Writes `out_dir/serving/<name>/<version>/` (SavedModel), merges
    `out_dir/serving/models.config`, and writes `out_dir/onnx/` (see
    `keras_primer.export`). Runs in a `KERAS_BACKEND=tensorflow` subprocess
    when this process uses another backend.

    Raises:
        keras_primer_cli.errors.ExportError: An expected failure
            (missing file or optional package, bad name, existing output
            without `overwrite`, a model too small for its warmup); nothing
            was written.
    """
    options = ExportOptions(model_path, out_dir, **options)
    if _backend() == "tensorflow":
        return run_export(check_options(options))
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    with tempfile.TemporaryDirectory() as scratch:
        result_file = os.path.join(scratch, "result.json")
        argv = [*options.argv(), "--result-file", result_file]
        process = subprocess.run(
            [sys.executable, "-m", "keras_primer_cli.export", *argv],
            env=env,
            capture_output=True,
            text=True,
        )
        # What the export said to its user (`_say`: notes, stale folders removed).
        for line in process.stderr.splitlines():
            if line.startswith(SAY_PREFIX) and not line.startswith(SAY_PREFIX + "error:"):
                print(line, file=sys.stderr, flush=True)
        result = None
        if os.path.exists(result_file):
            with open(result_file) as f:
                result = json.load(f)
    if result is not None and "error" in result:
        raise ExportError(result["error"])
    if process.returncode != 0 or result is None:
        raise RuntimeError(f"Export subprocess failed:\n{process.stderr[-4000:]}")
    return result["written"]


# The keywords of `export_model` are the fields of `ExportOptions`, declared there once.
export_model.__signature__ = inspect.signature(ExportOptions).replace(
    return_annotation=dict,
    parameters=[
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        if i >= 2
        else p.replace(default=inspect.Parameter.empty)
        for i, p in enumerate(inspect.signature(ExportOptions).parameters.values())
    ],
)


def default_max_new_tokens(max_sequence_length: int, start_tokens: int) -> int:
    """`generate`'s default: 32, or half of what the start token leaves, so a prompt fits.

    >>> default_max_new_tokens(256, 1), default_max_new_tokens(32, 1), default_max_new_tokens(3, 1)
    (32, 15, 1)
    """
    return min(DEFAULT_MAX_NEW_TOKENS, (max_sequence_length - start_tokens) // 2)


def fit_max_new_tokens(requested: int | None, max_sequence_length: int, start_tokens: int) -> int:
    """The `max_new_tokens` of the `generate` signature, leaving room for a prompt.

    Raises `ExportError` with the numbers when the model cannot hold a
    one-token prompt and one new token, or `--max-new-tokens` leaves no room.
    """
    room = max_sequence_length - start_tokens - 1  # new tokens after a one-token prompt
    if room < 1:
        raise ExportError(
            f"The model's max_sequence_length={max_sequence_length} holds {start_tokens} start "
            "token(s), no prompt token and no new token: it cannot serve any prompt. Train it "
            f"with a --sequence-length of at least {start_tokens + 2}."
        )
    if requested is None:
        return default_max_new_tokens(max_sequence_length, start_tokens)
    if requested > room:
        raise ExportError(
            f"--max-new-tokens {requested} leaves no room for a prompt: the model's "
            f"max_sequence_length={max_sequence_length} holds {start_tokens} start token(s), "
            f"a prompt of at least one token and at most {room} new tokens. Pass "
            f"--max-new-tokens {default_max_new_tokens(max_sequence_length, start_tokens)} "
            "or less."
        )
    return requested


@contextlib.contextmanager
def _quiet(verbose: bool):
    """Without `verbose`, the warnings of Keras (e.g. "Skipping variable loading
    for optimizer") and ONNX Runtime's quantization tool are not printed: the
    user of the export can do nothing about them."""
    if verbose:
        yield
        return
    root = logging.getLogger()
    level = root.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root.setLevel(logging.ERROR)  # onnxruntime.quantization logs through the root logger
        try:
            yield
        finally:
            root.setLevel(level)


def _load(path: str):
    from keras_primer.export.adapters import get_adapter, load_float32

    try:
        model = load_float32(path)
    except (ExportError, ImportError):
        raise
    except Exception as error:  # a corrupt or foreign file fails in many ways inside Keras
        message = " ".join(str(error).split())[:300]
        raise ExportError(
            f"Cannot load {path} as a keras-primer model ({type(error).__name__}: {message}): "
            "pass a .keras file written by `keras-primer train` or `model.save(...)`."
        ) from error
    try:
        return model, get_adapter(model)
    except ValueError as error:  # a Keras model of another kind (Sequential, ...)
        raise ExportError(
            f"{path}: {error} Pass a .keras file written by `keras-primer train`."
        ) from None


def _relocate(value, staged: str, final: str):
    """`value` (a path, or a dict of paths) with the `staged` prefix made `final`."""
    if isinstance(value, dict):
        return {k: _relocate(v, staged, final) for k, v in value.items()}
    if isinstance(value, str) and (value == staged or value.startswith(staged + os.sep)):
        return final + value[len(staged) :]
    return value


@contextlib.contextmanager
def _utf8_alias(folder: str):
    """Yields `folder`, or a link to it with a UTF-8 path when its own is not
    (a Linux path is bytes; TensorFlow and ONNX Runtime take paths as UTF-8
    text). The link, in the system's temporary folder, is removed after."""
    try:
        folder.encode("utf-8")
    except UnicodeEncodeError:
        with tempfile.TemporaryDirectory(prefix="keras-primer-export-") as scratch:
            link = os.path.join(scratch, "staging")
            os.symlink(folder, link)
            yield link
        return
    yield folder


def _swap_in(staged: str, final: str, trash: str) -> Callable[[], None]:
    """Renames `staged` to `final`; an existing `final` (an export's, or an
    empty folder: `check_outputs`) goes to `trash` first. Returns what undoes it."""
    created = []
    parent = os.path.dirname(final)
    while not os.path.lexists(parent):
        created.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(os.path.dirname(final), exist_ok=True)
    replaced = os.path.lexists(final)
    if replaced:
        os.rename(final, trash)
    os.rename(staged, final)

    def undo() -> None:
        os.rename(final, staged)
        if replaced:
            os.rename(trash, final)
        for folder in created:  # deepest first
            os.rmdir(folder)

    return undo


def _write_atomic(path: str, text: str, staging: str) -> Callable[[], None]:
    """Writes `path` through a file in `staging`; returns what puts the old one back."""
    old = os.path.join(staging, os.path.basename(path) + ".old")
    replaced = os.path.lexists(path)
    if replaced:
        shutil.copy2(path, old)
    tmp = os.path.join(staging, os.path.basename(path) + ".new")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)

    def undo() -> None:
        if replaced:
            os.replace(old, path)
        else:
            os.remove(path)

    return undo


def remove_stale_staging(out_dir: str) -> list[str]:
    """Removes the temporary folders of killed exports; call it holding the lock.

    Holding `--out`'s lock, no other export is writing, so every folder
    named as an export names its temporary folder (`EXPORT_STAGING`: our
    prefix and a unique suffix, the whole name) is left over; nothing else
    is touched. Returns the removed paths.
    """
    removed = []
    for entry in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, entry)
        if EXPORT_STAGING.matches(entry) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _say(message: str) -> None:
    print(f"{SAY_PREFIX}{printable(message)}", file=sys.stderr, flush=True)


def run_export(options: ExportOptions) -> dict:
    """Runs an export whose options passed `check_options`; returns the written paths."""
    if _backend() != "tensorflow":
        raise RuntimeError("run_export needs the TensorFlow backend; use export_model().")
    o = options
    created_out = not os.path.exists(o.out_dir)
    lock = FolderLock(o.out_dir, "export", on_wait=_say)
    with lock:
        try:
            for path in remove_stale_staging(o.out_dir):
                _say(f"removed {path}, left by an export that was stopped")
            config = check_outputs(o)
            with _quiet(o.verbose):
                return _export_locked(o, config)
        finally:
            # A failed export into a folder it created leaves no folder (a waiting
            # export sees its lock file gone and takes a new one: `FolderLock`).
            if created_out and os.listdir(o.out_dir) == [os.path.basename(lock.path)]:
                with contextlib.suppress(OSError):
                    os.remove(lock.path)
                    os.rmdir(o.out_dir)


def _export_locked(o: ExportOptions, config) -> dict:
    staging = os.path.join(o.out_dir, EXPORT_STAGING.name())
    try:
        os.mkdir(staging, 0o700)
        written = _write_and_move(o, config, staging)
    except Exception as error:
        resource = _resource_error(error)
        if resource is None:
            raise
        raise resource from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written


def _resource_error(error: Exception) -> ExportError | None:
    """TensorFlow's error for a full disk, no memory or no permission, as an
    `ExportError` (one line); None for any other error."""
    import tensorflow as tf

    if not isinstance(error, (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError)):
        return None
    message = " ".join(str(error.message).split())
    return ExportError(
        f"TensorFlow could not write the export ({type(error).__name__}: {message}). Check "
        "the free disk space, the memory and the permissions of --out; nothing was written "
        "to --out."
    )


def _write_and_move(o: ExportOptions, config, staging: str) -> dict:
    """Writes every file into `staging`, checks them, then moves them into place."""
    model, adapter = _load(o.model_path)
    start_tokens = 1 if adapter.tokenizer.add_start_token else 0
    max_new_tokens = fit_max_new_tokens(o.max_new_tokens, adapter.max_sequence_length, start_tokens)
    written: dict = {"name": o.name, "version": o.version}
    staged_onnx = os.path.join(staging, "onnx")
    with _utf8_alias(staging) as work:
        if o.saved_model:
            from keras_primer.export.saved_model import export_saved_model, replay_warmup

            version = export_saved_model(
                model,
                os.path.join(work, "serving"),
                o.name,
                o.version,
                default_max_new_tokens=max_new_tokens,
                xla=o.xla,
            )
            with quiet_native_logs():  # loading it logs tensorflow-text's SentencePiece
                replay_warmup(version)
            staged_version = _relocate(version, work, staging)
        if o.onnx:
            from keras_primer.export.onnx_export import export_onnx

            work_onnx = os.path.join(work, "onnx")
            written["onnx"] = _relocate(
                export_onnx(model, work_onnx, int8=o.int8), work_onnx, o.onnx_dir
            )
            if o.int8:
                from keras_primer.export.onnx_int8 import MEASURED_TRADEOFF

                _say(
                    f"note: {MEASURED_TRADEOFF}; this model has {model.count_params():,} parameters."
                )
    # Every file is written and checked: move the results into place, all or
    # nothing: a failure or a Ctrl-C on the way puts back what was there.
    with INTERRUPTS.deferred():
        undo = []
        try:
            if o.saved_model:
                trash = os.path.join(staging, "replaced-version")
                undo.append(_swap_in(staged_version, o.version_dir, trash))
                text = add_model(config, o.name, f"/models/{o.name}")
                undo.append(_write_atomic(o.models_config, text, staging))
                written["saved_model"] = o.version_dir
                written["models_config"] = o.models_config
            if o.onnx:
                undo.append(
                    _swap_in(staged_onnx, o.onnx_dir, os.path.join(staging, "replaced-onnx"))
                )
            INTERRUPTS.check()
        except BaseException:
            for step in reversed(undo):
                step()
            raise
        INTERRUPTS.finish()  # the export is complete: a later Ctrl-C changes nothing
    return written
