"""`import keras_primer` registers everything a saved file can reference, so a
compiled `.keras` file written by `keras-primer train` loads in a fresh process
with `safe_mode=True` on every backend."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Importing every module of the package must register nothing that
# `import keras_primer` alone did not already register.
WALK = r"""
import importlib, json, pkgutil
import keras
import keras_primer
after_package = set(keras.saving.get_custom_objects())
for module in pkgutil.walk_packages(keras_primer.__path__, "keras_primer."):
    if module.name.endswith("__main__"):
        continue
    importlib.import_module(module.name)
print(json.dumps({"package": sorted(after_package),
                  "missing": sorted(set(keras.saving.get_custom_objects()) - after_package)}))
"""

LOAD = r"""
import json, sys
import keras
import keras_primer
model = keras.saving.load_model(sys.argv[1], safe_mode=True)
print(json.dumps({
    "compiled": model.compiled,
    "optimizer": type(model.optimizer).__module__ + "." + type(model.optimizer).__name__,
    "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    "loss": type(model.loss).__name__,
}))
"""

# A few KB of text written for this test (any text does).
CORPUS = "\n".join(
    f"Line {i}: the {w} crossed the {v} at dawn, and {u} sang of rivers, stones and bread."
    for i, (w, v, u) in enumerate(
        [
            ("miller", "bridge", "the crow"),
            ("weaver", "field", "a child"),
            ("sailor", "square", "no one"),
        ]
        * 90
    )
)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def _json_line(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.tensorflow_only
def test_package_import_registers_every_serializable():
    report = _json_line(
        subprocess.run(
            [sys.executable, "-c", WALK], capture_output=True, text=True, env=_env(), timeout=1800
        )
    )
    assert report["missing"] == [], (
        f"registered only when their module is imported: {report['missing']}"
    )
    for name in (
        "keras_primer>AdamW",
        "keras_primer>PrimerCausalLM",
        "keras_primer>FeedbackCausalLM",
        "keras_primer>squared_relu",
        "keras_primer>PrimerSentencePieceTokenizer",
    ):
        assert name in report["package"], name


@pytest.mark.slow
def test_trained_file_loads_compiled_in_fresh_process(tmp_path):
    """`keras-primer train` on this backend (in this process: the load is what
    needs a fresh one), then `import keras_primer; load_model` in a fresh process."""
    from keras_primer_cli.train import main

    (tmp_path / "corpus.txt").write_text(CORPUS)
    run = tmp_path / "run"
    flags = ["--data", str(tmp_path / "corpus.txt"), "--out", str(run), "--preset", "tiny"]
    flags += ["--steps", "2", "--batch-size", "4", "--sequence-length", "16"]
    assert main([*flags, "--eval-interval", "2", "--sample-tokens", "0", "--verbose", "0"]) == 0
    loaded = _json_line(
        subprocess.run(
            [sys.executable, "-c", LOAD, str(run / "model.keras")],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=1800,
        )
    )
    assert loaded["compiled"] is True
    assert loaded["optimizer"] == "keras_primer.training.optimizer.AdamW"
    assert loaded["iterations"] == 2
