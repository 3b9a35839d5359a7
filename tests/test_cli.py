"""`keras-primer`: help and argument errors answer without a deep-learning framework,
and backend start-up logs stay out of the output unless --verbose."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.tensorflow_only  # backend-independent: runs once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FRAMEWORKS = ("keras", "tensorflow", "jax", "torch", "keras_hub", "keras_primer")

# Runs `keras-primer ARGV` in a fresh interpreter and reports the exit status
# and which framework modules it imported.
PROBE = textwrap.dedent(f"""
    import json, sys
    from keras_primer_cli.main import main
    try:
        status = main(sys.argv[1:])
    except SystemExit as exit:
        status = exit.code
    imported = sorted({{m.split(".")[0] for m in sys.modules}} & set({FRAMEWORKS!r}))
    print("PROBE " + json.dumps({{"status": status, "imported": imported}}))
""")


def _env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def _probe(*argv):
    result = subprocess.run(
        [sys.executable, "-c", PROBE, *argv],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=1800,
    )
    lines = result.stdout.splitlines()
    report = json.loads(lines[-1].removeprefix("PROBE "))
    return report, "\n".join(lines[:-1]), result.stderr


@pytest.mark.parametrize(
    "argv,usage",
    [
        (["--help"], "usage: keras-primer"),
        ([], "usage: keras-primer"),
        (["export", "--help"], "usage: keras-primer export"),
    ],
)
def test_help_imports_no_framework(argv, usage):
    report, out, err = _probe(*argv)
    assert report == {"status": 0, "imported": []}, err
    assert usage in out and err == ""


def test_train_help_imports_no_framework():
    report, out, err = _probe("train", "--help")
    assert report == {"status": 0, "imported": []}, err
    assert "usage: keras-primer train" in out and "--out" in out


def test_argument_errors_import_no_framework(tmp_path):
    report, _, err = _probe("frobnicate")
    assert report["status"] == 2 and report["imported"] == []
    assert "unknown command 'frobnicate'" in err
    # Errors the export finds before loading anything: one line, exit 2, no framework.
    report, _, err = _probe("export", str(tmp_path / "missing.keras"), "--out", str(tmp_path / "o"))
    assert report == {"status": 2, "imported": []}
    assert err.strip().count("\n") == 0 and "No model file at" in err
    assert not (tmp_path / "o").exists()


def test_runtime_modules_import_without_frameworks():
    import keras_primer_runtime

    names = sorted(
        m.name for m in __import__("pkgutil").iter_modules(keras_primer_runtime.__path__)
    )
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module('keras_primer_runtime.' + n)\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({FRAMEWORKS!r})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=1800
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_backend_logs_silenced_unless_verbose(tmp_path):
    """A failure after TensorFlow is imported is still exactly one stderr line."""
    bad = tmp_path / "bad.keras"
    bad.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: passes the cheap checks
    command = [
        sys.executable,
        "-m",
        "keras_primer_cli.main",
        "export",
        str(bad),
        "--out",
        str(tmp_path / "o"),
        "--no-onnx",
    ]
    env = _env()
    for name in ("TF_CPP_MIN_LOG_LEVEL", "ABSL_MIN_LOG_LEVEL", "KERAS_BACKEND"):
        env.pop(name, None)
    quiet = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    assert quiet.returncode == 2
    assert quiet.stderr.strip().splitlines() == [quiet.stderr.strip()], quiet.stderr
    assert f"Cannot load {bad}" in quiet.stderr
    loud = subprocess.run(
        [*command, "--verbose"], capture_output=True, text=True, env=env, timeout=1800
    )
    assert loud.returncode == 2 and f"Cannot load {bad}" in loud.stderr


def test_quiet_backend_logs_keeps_user_settings(monkeypatch):
    from keras_primer_cli import logging_setup

    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "1")
    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    logging_setup.quiet_backend_logs(False)
    try:
        assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1"
        assert os.environ["GRPC_VERBOSITY"] == "ERROR"
    finally:
        logging_setup.quiet_backend_logs(True)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "1" and "GRPC_VERBOSITY" not in os.environ
    assert logging_setup._FINDER not in sys.meta_path


# Loads a SentencePiece model into the keras-hub tokenizer (tensorflow-text's
# op, which logs "normalizer.cc(51) LOG(INFO) ..." on fd 2), quiet or not.
SENTENCEPIECE_LOAD = textwrap.dedent("""
    import sys
    from keras_primer_cli.logging_setup import quiet_backend_logs
    quiet_backend_logs(verbose=sys.argv[1] == "verbose")
    from keras_primer.data import train_sentencepiece
    from keras_primer.tokenizers import keras_tokenizer
    codec = train_sentencepiece([sys.argv[2]], 400)
    print(keras_tokenizer(codec)("ROMEO:").shape, flush=True)
""")


def test_sentencepiece_info_lines_are_silenced_unless_verbose():
    # Issue 32: every train and export with SentencePiece printed
    # "normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty ...".
    pytest.importorskip("tensorflow_text")
    sample = os.path.join(ROOT, "tests", "data", "sonnets.txt")
    env = _env(KERAS_BACKEND="tensorflow")
    for name in ("TF_CPP_MIN_LOG_LEVEL", "ABSL_MIN_LOG_LEVEL", "GLOG_minloglevel"):
        env.pop(name, None)
    runs = {
        mode: subprocess.run(
            [sys.executable, "-c", SENTENCEPIECE_LOAD, mode, sample],
            capture_output=True,
            text=True,
            env=env,
            timeout=1800,
        )
        for mode in ("quiet", "verbose")
    }
    for result in runs.values():
        assert result.returncode == 0, result.stderr[-3000:]
    assert "LOG(INFO)" not in runs["quiet"].stderr, runs["quiet"].stderr[-3000:]
    assert "normalizer.cc" in runs["verbose"].stderr  # the line the quiet run hides
