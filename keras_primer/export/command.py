"""`keras-primer export` behind its front end: load, export, move into place.

`keras_primer_runtime.export_cli` parses the arguments and checks all that
can be checked without TensorFlow (`plan_export`); `run_export(plan)` then
writes everything into a temporary folder inside `--out` and renames the
results into place only when every file is written and checked, so a
failed export leaves the output folder as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from keras_primer_runtime.export_cli import (
    ExportError,
    ExportPlan,
    merge_models_config,
    plan_export,
)
from keras_primer_runtime.export_cli import main as main  # `python -m keras_primer.export`

STAGING_PREFIX = ".keras-primer-export-"


def _backend() -> str:
    import keras

    return keras.backend.backend()


def export_model(
    model_path: str,
    out_dir: str,
    name: str | None = None,
    version: int = 1,
    max_new_tokens: int | None = None,
    int8: bool = False,
    saved_model: bool = True,
    onnx: bool = True,
    overwrite: bool = False,
) -> dict:
    """Exports a `.keras` causal LM to TF Serving and ONNX; returns the written paths.

    Writes `out_dir/serving/<name>/<version>/` (SavedModel), merges
    `out_dir/serving/models.config`, and writes `out_dir/onnx/` (see
    `keras_primer.export`). Runs in a `KERAS_BACKEND=tensorflow` subprocess
    when this process uses another backend.

    Raises:
        keras_primer_runtime.export_cli.ExportError: An expected failure
            (missing file or optional package, bad name, existing output
            without `overwrite`); nothing was written.
    """
    plan = plan_export(
        model_path,
        out_dir,
        name,
        version,
        max_new_tokens,
        int8=int8,
        saved_model=saved_model,
        onnx=onnx,
        overwrite=overwrite,
    )
    if _backend() == "tensorflow":
        return run_export(plan)
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    result = subprocess.run(
        [sys.executable, "-m", "keras_primer.export", *plan.argv(), "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode == 2 and "error: " in result.stderr:
        raise ExportError(result.stderr.strip().splitlines()[-1].split("error: ", 1)[1])
    if result.returncode != 0:
        raise RuntimeError(f"Export subprocess failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _load(path: str):
    from keras_primer.export.adapters import load_float32

    try:
        return load_float32(path)
    except (ExportError, ImportError):
        raise
    except Exception as error:  # a corrupt or foreign file fails in many ways inside Keras
        message = " ".join(str(error).split())[:300]
        raise ExportError(
            f"Cannot load {path} as a keras-primer model ({type(error).__name__}: {message}): "
            "pass a .keras file written by `keras-primer train` or `model.save(...)`."
        ) from error


def _relocate(value, staged: str, final: str):
    """`value` (a path, or a dict of paths) with the `staged` prefix made `final`."""
    if isinstance(value, dict):
        return {k: _relocate(v, staged, final) for k, v in value.items()}
    if isinstance(value, str) and (value == staged or value.startswith(staged + os.sep)):
        return final + value[len(staged) :]
    return value


def _swap_in(staged: str, final: str, trash: str) -> None:
    """Renames `staged` to `final`; an existing `final` goes to `trash` first."""
    os.makedirs(os.path.dirname(final), exist_ok=True)
    if os.path.lexists(final):
        os.rename(final, trash)
    os.rename(staged, final)


def run_export(plan: ExportPlan) -> dict:
    """Runs a checked export plan under the TensorFlow backend; returns the written paths."""
    if _backend() != "tensorflow":
        raise RuntimeError("run_export needs the TensorFlow backend; use export_model().")
    created_out = not os.path.exists(plan.out_dir)
    os.makedirs(plan.out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=plan.out_dir)
    try:
        model = _load(plan.model_path)
        max_new_tokens = plan.max_new_tokens
        if max_new_tokens is None:
            max_new_tokens = max(1, min(32, int(model.backbone.max_sequence_length) - 2))
        written: dict = {"name": plan.name, "version": plan.version}
        staged_serving = os.path.join(staging, "serving")
        staged_onnx = os.path.join(staging, "onnx")
        if plan.saved_model:
            from keras_primer.export.saved_model import export_saved_model

            staged_version = export_saved_model(
                model,
                staged_serving,
                plan.name,
                plan.version,
                default_max_new_tokens=max_new_tokens,
            )
            with open(os.path.join(staged_serving, "models.config")) as f:
                new_entry = f.read()
            existing = None
            if os.path.exists(plan.models_config):
                with open(plan.models_config) as f:
                    existing = f.read()
            merged_path = os.path.join(staging, "models.config")
            with open(merged_path, "w") as f:
                f.write(merge_models_config(existing, new_entry, plan.models_config))
                f.flush()
                os.fsync(f.fileno())
        if plan.onnx:
            from keras_primer.export.onnx_export import export_onnx

            written["onnx"] = _relocate(
                export_onnx(model, staged_onnx, int8=plan.int8), staged_onnx, plan.onnx_dir
            )
        # Every file is written and checked: move the results into place.
        if plan.saved_model:
            _swap_in(staged_version, plan.version_dir, os.path.join(staging, "replaced-version"))
            os.replace(merged_path, plan.models_config)
            written["saved_model"] = plan.version_dir
            written["models_config"] = plan.models_config
        if plan.onnx:
            _swap_in(staged_onnx, plan.onnx_dir, os.path.join(staging, "replaced-onnx"))
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_out and os.path.isdir(plan.out_dir) and not os.listdir(plan.out_dir):
            os.rmdir(plan.out_dir)


if __name__ == "__main__":
    sys.exit(main())
