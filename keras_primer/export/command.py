"""`keras-primer export MODEL.keras --out DIR [--name NAME --version N]`."""

import argparse
import json
import os
import re
import subprocess
import sys


def _parser():
    parser = argparse.ArgumentParser(
        prog="keras-primer export",
        description=(
            "Export a .keras causal LM (trained on any backend) to a TF Serving "
            "SavedModel and to ONNX. The export runs under the TensorFlow backend."
        ),
    )
    parser.add_argument("model", help="path to the .keras file")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--name", default=None, help="TF Serving model name (default: file stem)")
    parser.add_argument("--version", type=int, default=1, help="TF Serving version (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="new tokens of the `generate` signature (default: 32, "
                             "or fewer when the model's max_sequence_length needs it)")
    parser.add_argument("--int8", action="store_true", help="also write int8-quantized ONNX models")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX files")
    parser.add_argument("--no-saved-model", action="store_true", help="skip the SavedModel")
    parser.add_argument("--json", action="store_true", help="print the written paths as JSON")
    return parser


def _default_name(path):
    stem = os.path.splitext(os.path.basename(path))[0]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", stem) or "model"


def _backend():
    import keras

    return keras.backend.backend()


def export_model(model_path, out_dir, name=None, version=1, max_new_tokens=None, int8=False,
                 saved_model=True, onnx=True):
    """Exports `model_path`; returns `{"saved_model": dir, "onnx": {...}, ...}`.

    Runs a `KERAS_BACKEND=tensorflow` subprocess when this process uses
    another backend.
    """
    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"No model file at {model_path}")
    name = name or _default_name(model_path)
    if _backend() != "tensorflow":
        argv = [model_path, "--out", out_dir, "--name", name, "--version", str(version), "--json"]
        argv += ["--max-new-tokens", str(max_new_tokens)] if max_new_tokens is not None else []
        argv += ["--int8"] * int8 + ["--no-onnx"] * (not onnx) + ["--no-saved-model"] * (not saved_model)
        env = dict(os.environ, KERAS_BACKEND="tensorflow")
        result = subprocess.run(
            [sys.executable, "-m", "keras_primer.export", *argv],
            env=env, capture_output=True, text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"Export subprocess failed:\n{result.stderr[-4000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    from keras_primer.export.adapters import load_float32

    model = load_float32(model_path)
    if max_new_tokens is None:
        max_new_tokens = max(1, min(32, int(model.backbone.max_sequence_length) - 2))
    written = {"name": name, "version": int(version)}
    if saved_model:
        from keras_primer.export.saved_model import export_saved_model

        base = os.path.join(out_dir, "serving")
        written["saved_model"] = export_saved_model(
            model, base, name, version, default_max_new_tokens=max_new_tokens
        )
        written["models_config"] = os.path.join(base, "models.config")
    if onnx:
        from keras_primer.export.onnx_export import export_onnx

        written["onnx"] = export_onnx(model, os.path.join(out_dir, "onnx"), int8=int8)
    return written


def main(argv=None):
    args = _parser().parse_args(argv)
    try:
        written = export_model(
            args.model, args.out, args.name, args.version, args.max_new_tokens,
            int8=args.int8, saved_model=not args.no_saved_model, onnx=not args.no_onnx,
        )
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as error:
        print(f"keras-primer export: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(written))
        return 0
    if "saved_model" in written:
        print(f"SavedModel (TF Serving layout): {written['saved_model']}")
        print(f"TF Serving config:              {written['models_config']}")
    for key, path in written.get("onnx", {}).items():
        print(f"ONNX {key + ':':<22} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
