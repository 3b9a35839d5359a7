"""`keras-primer export` as a command: checks before writing, atomic results,
safe names, merged `models.config`, one-line errors with exit code 2.

The SavedModel and ONNX writers are replaced by small fakes here (their own
tests export for real); what is tested is what the command does around them.
"""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading

import pytest
from export_helpers import SIGINT_PREAMBLE

from keras_primer_cli import errors, export_options, ownership

pytestmark = pytest.mark.tensorflow_only

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A hang guard only, never a speed check.
HANG_GUARD_S = 1800


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from export_helpers import make_model

    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    make_model().save(str(path))
    return str(path)


@pytest.fixture
def fakes(monkeypatch):
    """Fake exporters that write a few files; `fail` makes one raise midway."""
    from keras_primer.export import onnx_export, saved_model

    state = {"fail": None, "calls": [], "hold": None, "holding": threading.Event()}

    def fake_saved_model(
        model, base_dir, model_name, version, default_max_new_tokens=32, xla=False
    ):
        base_dir.encode("utf-8")  # as TensorFlow does: a path must be UTF-8 text
        version_dir = os.path.join(base_dir, model_name, str(version))
        os.makedirs(os.path.join(version_dir, "variables"))
        with open(os.path.join(version_dir, "saved_model.pb"), "w") as f:
            f.write(f"v{version} max_new_tokens={default_max_new_tokens}")
        state["calls"].append(("saved_model", model_name, version))
        if state["fail"] == "saved_model":
            raise OSError(28, "No space left on device", os.path.join(version_dir, "variables"))
        if state["fail"] == "full_disk":  # what TensorFlow's own writer raises
            import tensorflow as tf

            raise tf.errors.ResourceExhaustedError(
                None, None, f"{version_dir}/saved_model.pb.tmp1234; No space left on device"
            )
        if state["hold"] is not None:  # a slow export: wait until the test lets it go on
            state["holding"].set()
            assert state["hold"].wait(600)
        return version_dir

    def fake_replay(version_dir):
        state["calls"].append(("replay", version_dir))
        if state["fail"] == "replay":
            raise errors.ExportError("Warmup request 2 (generate) fails")

    def fake_onnx(model, out_dir, int8=False):
        out_dir.encode("utf-8")  # as ONNX Runtime does
        os.makedirs(out_dir)
        path = os.path.join(out_dir, "model.onnx")
        with open(path, "w") as f:
            f.write("onnx")
        with open(os.path.join(out_dir, ownership.ONNX_CONFIG_FILE), "w") as f:
            f.write("{}")
        state["calls"].append(("onnx", int8))
        if state["fail"] == "onnx":
            raise RuntimeError("tf2onnx could not convert the decoder step")
        return {"model": path}

    monkeypatch.setattr(saved_model, "export_saved_model", fake_saved_model)
    monkeypatch.setattr(saved_model, "replay_warmup", fake_replay)
    monkeypatch.setattr(onnx_export, "export_onnx", fake_onnx)
    return state


def _run(capsys, *argv):
    from keras_primer_cli.export import main

    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _tree(root):
    """Every path under `root` but the lock file (which records its last holder)."""
    return sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, dirs, files in os.walk(root)
        for f in files + dirs
        if f != ".lock"
    )


def test_versions_and_models_are_merged_not_overwritten(model_path, fakes, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, model_path, "--out", out, "--name", "tiny")[0] == 0
    assert (
        _run(capsys, model_path, "--out", out, "--name", "tiny", "--version", 2, "--no-onnx")[0]
        == 0
    )
    status, stdout, _ = _run(capsys, model_path, "--out", out, "--name", "other", "--no-onnx")
    assert status == 0 and str(out / "serving" / "other" / "1") in stdout
    assert sorted(os.listdir(out / "serving" / "tiny")) == ["1", "2"]
    config = export_options.read_models_config((out / "serving" / "models.config").read_text())
    assert [(c.name, c.base_path) for c in config.model_config_list.config] == [
        ("tiny", "/models/tiny"),
        ("other", "/models/other"),
    ]
    assert sorted(os.listdir(out)) == [".lock", "onnx", "serving"]  # no temporary folder left


def test_int8_prints_the_measured_tradeoff_beside_the_model_size(
    model_path, fakes, tmp_path, capsys
):
    """Issue 31.5: small models gain little from int8; the export says what
    was measured and how large this model is."""
    import keras

    from keras_primer.export.onnx_int8 import MEASURED_TRADEOFF

    status, _, err = _run(capsys, model_path, "--out", tmp_path / "out", "--int8")
    assert status == 0 and ("onnx", True) in fakes["calls"]
    size = keras.saving.load_model(model_path).count_params()
    assert (
        f"keras-primer export: note: {MEASURED_TRADEOFF}; this model has {size:,} parameters."
        in err
    )
    _, _, err = _run(capsys, model_path, "--out", tmp_path / "plain")
    assert "--int8" not in err


def test_export_from_another_backend_passes_on_the_subprocess_notes(
    model_path, tmp_path, monkeypatch, capsys
):
    """`export_model` on JAX or PyTorch exports in a TensorFlow subprocess:
    what that export says to its user (notes) reaches this process's stderr;
    its error comes back as the `ExportError` raised here, not printed too."""
    import subprocess as subprocess_module

    from keras_primer.export import command

    def fake_run(args, **kwargs):
        result_file = args[args.index("--result-file") + 1]
        with open(result_file, "w") as f:
            json.dump({"written": {"name": "m"}}, f)
        stderr = (
            "2026 TensorFlow start-up log\n"
            "keras-primer export: note: --int8 measured ...; this model has 1,234.\n"
        )
        return subprocess_module.CompletedProcess(args, 0, "", stderr)

    monkeypatch.setattr(command, "_backend", lambda: "jax")
    monkeypatch.setattr(command.subprocess, "run", fake_run)
    assert command.export_model(model_path, str(tmp_path / "out")) == {"name": "m"}
    err = capsys.readouterr().err
    assert err == "keras-primer export: note: --int8 measured ...; this model has 1,234.\n"

    def failing_run(args, **kwargs):
        result_file = args[args.index("--result-file") + 1]
        with open(result_file, "w") as f:
            json.dump({"error": "--int8: nothing to quantize", "expected": True}, f)
        return subprocess_module.CompletedProcess(
            args, 2, "", "keras-primer export: error: --int8: nothing to quantize\n"
        )

    monkeypatch.setattr(command.subprocess, "run", failing_run)
    with pytest.raises(errors.ExportError, match="--int8: nothing to quantize"):
        command.export_model(model_path, str(tmp_path / "out"))
    assert capsys.readouterr().err == ""


def test_existing_version_needs_overwrite(model_path, fakes, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, model_path, "--out", out, "--name", "m", "--max-new-tokens", 3)[0] == 0
    before = _tree(out)
    status, _, err = _run(capsys, model_path, "--out", out, "--name", "m")
    assert status == 2 and "already exists: pass --overwrite" in err and err.count("\n") == 1
    assert _tree(out) == before and len(fakes["calls"]) == 3  # refused before any work
    status, _, err = _run(capsys, model_path, "--out", out, "--name", "m", "--overwrite")
    assert status == 0, err
    assert (out / "serving" / "m" / "1" / "saved_model.pb").read_text() == "v1 max_new_tokens=15"
    assert _tree(out) == before


@pytest.mark.parametrize("where", ["saved_model", "replay", "onnx", "full_disk"])
def test_failed_export_leaves_output_as_it_was(model_path, fakes, tmp_path, capsys, where):
    out = tmp_path / "out"
    assert _run(capsys, model_path, "--out", out, "--name", "m")[0] == 0
    before = {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()}
    fakes["fail"] = where
    # --overwrite: the old ONNX files must survive a failed replacement too.
    status, _, err = _run(
        capsys, model_path, "--out", out, "--name", "m", "--version", 2, "--overwrite"
    )
    assert status == 2 and err.count("\n") == 1, err
    # Issue 32: TensorFlow's ResourceExhaustedError on a full disk was a 29-line traceback.
    expected = {
        "saved_model": "No space left",
        "replay": "Warmup request 2",
        "onnx": "tf2onnx",
        "full_disk": "TensorFlow could not write the export (ResourceExhaustedError: ",
    }
    assert expected[where] in err
    after = {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()}
    assert after == before  # no version 2, no temporary folder, old files untouched
    # A failed first export into a new folder leaves no folder at all.
    status, _, _ = _run(capsys, model_path, "--out", tmp_path / "fresh", "--name", "m")
    assert status == 2 and not (tmp_path / "fresh").exists()


@pytest.mark.parametrize(
    "name", ["../../x", "/abs", "a/b", ".hidden", "..", "a b", 'q"x', "v1:predict", "x" * 129, ""]
)
def test_bad_model_names_are_refused_before_writing(model_path, fakes, tmp_path, capsys, name):
    status, _, err = _run(capsys, model_path, "--out", tmp_path / "out", "--name", name)
    assert status == 2 and "is not a TF Serving model name" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not fakes["calls"]
    assert not (tmp_path.parent / "x").exists()


def test_symlink_out_of_out_is_refused(model_path, fakes, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", out / "serving")
    status, _, err = _run(capsys, model_path, "--out", out, "--name", "m")
    assert status == 2 and "resolves outside --out" in err
    assert not os.listdir(tmp_path / "elsewhere")


@pytest.mark.parametrize(
    "module,package,extra,flag",
    [
        ("tensorflow_serving", "tensorflow-serving-api", "serving", "--no-saved-model"),
        ("tf2onnx", "tf2onnx", "onnx", "--no-onnx"),
        ("onnxruntime", "onnxruntime", "onnx", "--no-onnx"),
    ],
)
def test_missing_optional_package_is_found_before_writing(
    model_path, fakes, tmp_path, capsys, monkeypatch, module, package, extra, flag
):
    monkeypatch.setitem(__import__("sys").modules, module, None)  # find_spec -> None
    status, _, err = _run(capsys, model_path, "--out", tmp_path / "out")
    assert status == 2 and err.count("\n") == 1
    assert f"{package} not installed: pip install 'keras-primer[{extra}]'" in err and flag in err
    assert not (tmp_path / "out").exists() and not fakes["calls"]
    # Skipping the format that needs it works.
    assert _run(capsys, model_path, "--out", tmp_path / "out", flag)[0] == 0


def test_bad_inputs_are_one_line_with_exit_2(model_path, fakes, tmp_path, capsys):
    not_zip = tmp_path / "notes.keras"
    not_zip.write_text("hello")
    empty_zip = tmp_path / "empty.keras"
    empty_zip.write_bytes(b"PK\x05\x06" + b"\0" * 18)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    out = tmp_path / "out"
    cases = [
        ((tmp_path / "missing.keras", "--out", out), "No model file at"),
        ((not_zip, "--out", out), f"{not_zip} is not a .keras file"),
        ((empty_zip, "--out", out), f"Cannot load {empty_zip}"),
        ((model_path, "--out", a_file), "is a file: pass a folder"),
        ((model_path, "--out", out, "--version", 0), "--version must be an integer from 1"),
        ((model_path, "--out", out, "--version", 2**64), "--version must be an integer from 1"),
        ((model_path, "--out", out, "--max-new-tokens", 0), "--max-new-tokens must be an"),
        ((model_path, "--out", out, "--no-onnx", "--no-saved-model"), "nothing to export"),
    ]
    for argv, expected in cases:
        status, stdout, err = _run(capsys, *argv)
        assert status == 2 and expected in err and err.count("\n") == 1, (argv, err)
        assert err.startswith("keras-primer export: error: ")
    assert not out.exists() and not fakes["calls"]
    with pytest.raises(errors.ExportError):
        _run(capsys, not_zip, "--out", out, "--debug")


def test_models_config_merge_escapes_and_keeps_entries():
    existing = (
        'model_config_list { config { name: "old" base_path: "/srv/old" '
        'model_platform: "tensorflow" model_version_policy { all {} } } }'
    )
    config = export_options.read_models_config(existing)
    merged = export_options.add_model(config, 'a"b', '/models/a"b')
    again = export_options.add_model(export_options.read_models_config(merged), 'a"b', "/elsewhere")
    assert again == merged
    config = export_options.read_models_config(merged)
    assert [c.name for c in config.model_config_list.config] == ["old", 'a"b']
    assert config.model_config_list.config[0].model_version_policy.HasField("all")
    assert 'name: "a\\"b"' in merged
    with pytest.raises(errors.ExportError, match="not a TF Serving model config"):
        export_options.read_models_config("model_config_list { oops", "/x/models.config")


def test_unreadable_models_config_is_refused_before_writing(model_path, fakes, tmp_path, capsys):
    (tmp_path / "out" / "serving").mkdir(parents=True)
    (tmp_path / "out" / "serving" / "models.config").write_text("this is not a proto {")
    status, _, err = _run(capsys, model_path, "--out", tmp_path / "out", "--name", "m")
    assert status == 2 and "models.config is not a TF Serving model config" in err
    assert not fakes["calls"]


def test_export_model_api_raises_export_error(model_path, tmp_path):
    from keras_primer.export import export_model

    with pytest.raises(errors.ExportError, match="is not a TF Serving model name"):
        export_model(model_path, str(tmp_path / "out"), name="../up")


def test_mixed_bfloat16_model_loads_as_float32(tmp_path):
    """A model trained in mixed_bfloat16 exports as float32; its tokenizer keeps
    its int32 policy (forcing that to float32 made the model unloadable)."""
    import keras
    import numpy as np
    from export_helpers import make_model

    from keras_primer.export.adapters import load_float32

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = make_model()
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.preprocessor.tokenizer.dtype_policy.name == "int32"
    path = str(tmp_path / "mixed.keras")
    model.save(path)
    clone = load_float32(path)
    assert clone.dtype_policy.name == "float32"
    assert clone.preprocessor.tokenizer.dtype_policy.name == "int32"
    for saved, loaded in zip(model.get_weights(), clone.get_weights()):
        assert loaded.dtype == np.float32
        np.testing.assert_array_equal(loaded, saved.astype(np.float32))


def test_options_are_declared_once():
    """The parser, the subprocess arguments and `export_model`'s keywords all come
    from `ExportOptions`."""
    import dataclasses
    import inspect

    from keras_primer.export import export_model

    fields = [f.name for f in dataclasses.fields(export_options.ExportOptions)]
    assert list(inspect.signature(export_model).parameters) == fields
    options = export_options.ExportOptions(
        "m.keras", "out", name="x", version=3, max_new_tokens=5, int8=True, onnx=False
    )
    args = export_options.build_parser().parse_args(options.argv())
    assert export_options.options_from_args(args) == options
    defaults = export_options.options_from_args(
        export_options.build_parser().parse_args(["m.keras", "--out", "o"])
    )
    assert defaults == export_options.ExportOptions("m.keras", "o")


def _export_in_thread(model_path, out, results, key, **options):
    """Runs one export in a thread; its result (or ExportError) goes to `results[key]`
    (keyed by what produced it: the threads finish in either order)."""
    from keras_primer.export.command import run_export

    def run():
        try:
            opts = export_options.ExportOptions(model_path, str(out), **options)
            results[key] = run_export(export_options.check_options(opts))
        except errors.ExportError as error:
            results[key] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("same_name", [False, True])
def test_two_exports_into_one_out_leave_both_or_one_refusal(
    model_path, fakes, tmp_path, monkeypatch, same_name
):
    """Two exports into one --out: the second waits for the first (the lock names
    it); different names leave both models, the same name and version one clear
    refusal. (Before the lock, both exit 0 and one model is lost.)"""
    from keras_primer.export import command

    waiting = threading.Event()
    messages = []
    monkeypatch.setattr(command, "_say", lambda m: (messages.append(m), waiting.set()))
    out, results = tmp_path / "out", {}
    fakes["hold"] = release = threading.Event()
    first = _export_in_thread(model_path, out, results, "first", name="a")
    assert fakes["holding"].wait(600)  # the first export is in its SavedModel writer
    other_model = tmp_path / "other.keras"  # the same name from another model file
    shutil.copy(model_path, other_model)
    second = _export_in_thread(
        str(other_model), out, results, "second", name="a" if same_name else "b", onnx=False
    )
    assert waiting.wait(600)  # the second one waits for the lock...
    assert "in use by another export (pid" in messages[0]
    release.set()  # ...until the first has moved its files into place
    first.join(600)
    second.join(600)
    assert isinstance(results["first"], dict)
    config = export_options.read_models_config((out / "serving" / "models.config").read_text())
    names = [c.name for c in config.model_config_list.config]
    if same_name:
        assert isinstance(results["second"], errors.ExportError)
        assert "already exists: pass --overwrite" in str(results["second"])
        assert names == ["a"]
    else:
        assert isinstance(results["second"], dict)
        assert names == ["a", "b"]
        assert (out / "serving" / "b" / "1" / "saved_model.pb").exists()
    assert (out / "serving" / "a" / "1" / "saved_model.pb").exists()
    assert sorted(os.listdir(out)) == [".lock", "onnx", "serving"]


def test_onnx_folder_is_not_replaced_without_overwrite(model_path, fakes, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, model_path, "--out", out, "--name", "a")[0] == 0
    status, _, err = _run(capsys, model_path, "--out", out, "--name", "b")
    assert status == 2 and f"{out / 'onnx'} already exists: pass --overwrite" in err


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize(
    "path,kind",
    [
        ("onnx", "file"),
        ("serving", "file"),
        ("serving/m", "file"),
        ("serving/models.config", "folder"),
        ("onnx", "user folder"),
        ("serving/m/1", "user folder"),
    ],
)
def test_paths_an_export_did_not_create_are_refused_before_any_work(
    model_path, fakes, tmp_path, capsys, path, kind, overwrite
):
    """Issue 32: a user's file named `onnx` was replaced by the ONNX folder (rc 0);
    a file named `serving` was refused only after the whole export's work. An
    export moves or deletes only what an export wrote, with or without
    --overwrite, and checks every output path first."""
    out = tmp_path / "out"
    target = out / path
    target.parent.mkdir(parents=True)
    if kind == "file":
        target.write_text("the user's own")
    else:
        target.mkdir()
        (target / "notes.txt").write_text("the user's own")
    before = {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()}
    argv = [model_path, "--out", out, "--name", "m"] + (["--overwrite"] if overwrite else [])
    status, _, err = _run(capsys, *argv)
    assert status == 2 and err.count("\n") == 1, err
    assert str(target) in err and "Nothing was written" in err
    if kind == "user folder":
        assert "was not written by keras-primer export" in err
    assert not fakes["calls"]  # refused before the model was even loaded
    assert {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()} == before


def test_overwrite_replaces_an_earlier_export(model_path, fakes, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, model_path, "--out", out, "--name", "m")[0] == 0
    (out / "onnx" / "model.onnx").write_text("old")
    assert _run(capsys, model_path, "--out", out, "--name", "m", "--overwrite")[0] == 0
    assert (out / "onnx" / "model.onnx").read_text() == "onnx"


def test_out_whose_path_is_not_utf8_is_exported(model_path, fakes, tmp_path, capsys):
    # Issue 32: a non-UTF-8 byte in --out failed at the lock ("'utf-8' codec can't
    # encode ..."), then in TensorFlow's writer. Linux paths are bytes.
    out = tmp_path / os.fsdecode(b"ex\xff")
    status, stdout, err = _run(capsys, model_path, "--out", out, "--name", "m")
    assert status == 0, err
    assert sorted(os.listdir(out)) == [".lock", "onnx", "serving"]
    assert (out / "serving" / "m" / "1" / "saved_model.pb").exists()
    assert errors.printable(str(out / "serving" / "m" / "1")) in stdout  # shown as \xff
    assert not [n for n in os.listdir(tmp_path) if n != os.path.basename(out)]


def test_stale_staging_folders_are_removed(model_path, fakes, tmp_path, capsys):
    out = tmp_path / "out"
    stale = out / ownership.EXPORT_STAGING.name()
    (stale / "serving").mkdir(parents=True)
    (stale / "serving" / "big.bin").write_bytes(b"x" * 1000)
    # Issue 32: only our exact name is ours; a look-alike of the user's stays.
    mine = out / ".keras-primer-export-mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("the user's own")
    status, _, err = _run(capsys, model_path, "--out", out, "--name", "m")
    assert status == 0 and not stale.exists()
    assert f"removed {stale}, left by an export that was stopped" in err
    assert (mine / "keep.txt").read_text() == "the user's own"


def test_model_too_small_or_too_many_new_tokens_name_the_numbers(
    model_path, fakes, tmp_path, capsys
):
    from keras_primer.export.command import fit_max_new_tokens

    with pytest.raises(errors.ExportError, match="max_sequence_length=2 holds 1 start"):
        fit_max_new_tokens(None, 2, 1)
    assert fit_max_new_tokens(None, 3, 1) == 1
    # The tiny model has max_sequence_length=32: 1 start token, >= 1 prompt token.
    status, _, err = _run(capsys, model_path, "--out", tmp_path / "o", "--max-new-tokens", 31)
    assert status == 2 and err.count("\n") == 1
    assert "--max-new-tokens 31 leaves no room for a prompt" in err and "at most 30" in err
    assert "default_max_new_tokens" not in err
    assert _run(capsys, model_path, "--out", tmp_path / "o", "--max-new-tokens", 30)[0] == 0


def test_plain_keras_model_is_one_line(fakes, tmp_path, capsys):
    import keras

    path = tmp_path / "sequential.keras"
    keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]).save(str(path))
    status, _, err = _run(capsys, path, "--out", tmp_path / "out")
    assert status == 2 and err.count("\n") == 1
    assert f"{path}: Cannot export a Sequential" in err
    assert not (tmp_path / "out").exists() and not fakes["calls"]


def test_export_prints_only_its_own_lines(caplog):
    """Keras' "Skipping variable loading for optimizer" warning and ONNX Runtime's
    quantization warnings (root logger) are silenced unless --verbose."""
    import logging
    import warnings

    from keras_primer.export.command import _quiet

    def noisy():
        with warnings.catch_warnings(record=True) as caught:
            with _quiet(verbose):
                warnings.warn("Skipping variable loading for optimizer 'adam'", stacklevel=1)
                logging.warning("Please consider to run pre-processing before quantization.")
        return [str(w.message) for w in caught], [r.getMessage() for r in caplog.records]

    verbose = False
    assert noisy() == ([], [])
    verbose = True
    warned, logged = noisy()
    assert "Skipping variable loading" in warned[0] and "pre-processing" in logged[0]


@pytest.mark.parametrize(
    "host,model_name,match",
    [
        ("localhost", "../admin", "`model_name` '../admin' is not a TF Serving model name"),
        ("localhost", "a/b", "is not a TF Serving model name"),
        ("localhost/../x", "primer", "`host` 'localhost/../x' is not a host name"),
        ("user@evil:80", "primer", "is not a host name"),
    ],
)
def test_serving_client_refuses_urls_that_escape(host, model_name, match):
    from keras_primer_runtime import serving_client as sc

    with pytest.raises(ValueError, match=match):
        sc.rest_url(host, 8501, model_name)
    assert sc.rest_url("[::1]", 8501, "m", 2) == "http://[::1]:8501/v1/models/m/versions/2:predict"


def test_subprocess_export_error_comes_from_the_result_not_stderr(
    model_path, tmp_path, monkeypatch
):
    """A caller on another backend gets the child's `ExportError` from its result
    file (the child's stderr is not parsed)."""
    from keras_primer.export import command

    monkeypatch.setattr(command, "_backend", lambda: "jax")
    with pytest.raises(errors.ExportError) as caught:
        command.export_model(model_path, str(tmp_path / "out"), name="../up")
    assert str(caught.value).startswith("--name '../up' is not a TF Serving model name")
    assert not (tmp_path / "out").exists()


def _imports_library(node) -> bool:
    if isinstance(node, ast.ImportFrom):
        return (node.module or "").split(".")[0] == "keras_primer"
    if isinstance(node, ast.Import):
        return any(alias.name.split(".")[0] == "keras_primer" for alias in node.names)
    return False


def test_runtime_imports_the_library_only_in_each_cli_entry_function():
    """`keras_primer_runtime` never imports `keras_primer`, except one late import
    of the entry function inside each CLI's `main`."""
    import keras_primer_runtime

    root = os.path.dirname(keras_primer_runtime.__file__)
    for filename in sorted(f for f in os.listdir(root) if f.endswith(".py")):
        with open(os.path.join(root, filename)) as f:
            tree = ast.parse(f.read())
        imports = [node for node in ast.walk(tree) if _imports_library(node)]
        in_main = [
            node
            for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef) and function.name == "main"
            for node in ast.walk(function)
            if _imports_library(node)
        ]
        assert len(imports) <= 1 and imports == in_main, filename
    # The library side imports the front end, not the other way round: the
    # export command is entered through `run_export` only (no `main` of its own).
    from keras_primer.export import command

    assert not hasattr(command, "main")


def test_onnx_state_names_and_config_file_are_declared_once():
    """Each family names its ONNX state tensors on its `StateSpec`s; the exporter
    derives them (no family's names in onnx_export.py), and `export_config.json`
    is spelled in one module."""
    import keras_primer
    import keras_primer_runtime
    from keras_primer.export import onnx_export
    from keras_primer_runtime.generation import StateSpec

    with open(onnx_export.__file__) as f:
        tree = ast.parse(f.read())
    docstrings = {
        id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)
    }  # the module's documentation may name them
    strings = [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and id(node) not in docstrings
    ]
    for family_name in ("key_value", "conv", "past_key_values", "present.", "present_"):
        assert not [s for s in strings if family_name in s], family_name
    specs = [StateSpec(("memory", g), ("batch", "length", 4), f"memory.{g}") for g in range(3)]
    assert [(t["past"], t["present"], t["shape"]) for t in map(StateSpec.to_json, specs)] == [
        (f"memory.{g}", f"present_memory.{g}", ["batch", "length", 4]) for g in range(3)
    ]
    spelled = []
    for package in (keras_primer, keras_primer_runtime):
        root = os.path.dirname(package.__file__)
        for folder, _, files in os.walk(root):
            for filename in files:
                if filename.endswith(".py"):
                    with open(os.path.join(folder, filename)) as f:
                        if '"export_config.json"' in f.read():
                            spelled.append(filename)
    assert spelled == ["export_folder.py"]


def test_a_failure_while_moving_into_place_puts_back_what_was_there(
    model_path, fakes, tmp_path, capsys, monkeypatch
):
    from keras_primer.export import command

    out = tmp_path / "out"
    assert _run(capsys, model_path, "--out", out, "--name", "m")[0] == 0
    before = {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()}
    moves = []
    swap_in = command._swap_in

    def failing_second_move(staged, final, trash):
        moves.append(final)
        if len(moves) == 2:  # ONNX, after the new version and models.config are in place
            raise OSError(28, "No space left on device", final)
        return swap_in(staged, final, trash)

    monkeypatch.setattr(command, "_swap_in", failing_second_move)
    argv = [model_path, "--out", out, "--name", "n", "--overwrite"]
    status, _, err = _run(capsys, *argv)
    assert status == 2 and "No space left on device" in err, err
    assert {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()} == before
    assert sorted(os.listdir(out / "serving")) == ["m", "models.config"]  # no empty n/


# Runs `keras-primer export ARGV` in a fresh interpreter that sends itself SIGINT
# (what Ctrl-C sends) at one point (argv[1]). The exporters are small fakes.
_INTERRUPTED_EXPORT = SIGINT_PREAMBLE + textwrap.dedent("""
    if where == "before_tensorflow":
        import keras_primer_cli.export as cli

        check_options = cli.check_options

        def checked_then_interrupted(options):
            options = check_options(options)
            assert "tensorflow" not in sys.modules
            interrupt()
            return options

        cli.check_options = checked_then_interrupted
    elif where == "importing_tensorflow":

        class Interrupter:
            def find_spec(self, name, path=None, target=None):
                if name == "tensorflow":
                    sys.meta_path.remove(self)
                    interrupt()
                return None

        sys.meta_path.insert(0, Interrupter())
    else:
        from keras_primer.export import command, onnx_export, saved_model

        def fake_saved_model(model, base_dir, name, version, default_max_new_tokens=32, xla=False):
            version_dir = os.path.join(base_dir, name, str(version))
            os.makedirs(version_dir)
            open(os.path.join(version_dir, "saved_model.pb"), "w").close()
            if where == "exporting":
                interrupt()
            elif where == "collecting_garbage":
                interrupt_during_gc()
            return version_dir

        def fake_onnx(model, out_dir, int8=False):
            os.makedirs(out_dir)
            open(os.path.join(out_dir, "export_config.json"), "w").close()
            return {}

        saved_model.export_saved_model = fake_saved_model
        saved_model.replay_warmup = lambda version_dir: None
        onnx_export.export_onnx = fake_onnx
        if where == "moving_into_place":
            swap_in = command._swap_in

            def interrupted_swap_in(staged, final, trash):
                undo = swap_in(staged, final, trash)
                interrupt()
                return undo

            command._swap_in = interrupted_swap_in

    from keras_primer_cli.export import main

    sys.exit(main(sys.argv[2:]))
""")


@pytest.mark.slow
@pytest.mark.parametrize(
    "where, fresh_out",
    [
        # Before staging: nothing of --out is touched yet, a new --out suffices.
        ("before_tensorflow", True),
        ("importing_tensorflow", True),
        # Staged, then interrupted: a new --out and an earlier export in it.
        ("exporting", False),
        ("collecting_garbage", True),
        ("moving_into_place", True),
        ("moving_into_place", False),
    ],
)
def test_ctrl_c_always_ends_with_130_and_out_as_it_was(model_path, tmp_path, where, fresh_out):
    """Issue 32: Ctrl-C during an export printed 46-70 lines of traceback, and one
    in the first seconds (it landed in JAX's garbage-collector callback) was lost:
    the export finished with status 0."""
    out = tmp_path / "out"
    if not fresh_out:  # an earlier export, to be left as it is
        (out / "serving" / "m" / "1").mkdir(parents=True)
        (out / "serving" / "m" / "1" / "saved_model.pb").write_text("earlier")
        (out / "serving" / "models.config").write_text(
            'model_config_list { config { name: "m" base_path: "/models/m" } }\n'
        )
        (out / "onnx").mkdir()
        (out / "onnx" / "export_config.json").write_text("earlier")
    before = {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()}
    argv = [model_path, "--out", str(out), "--name", "m", "--version", "2", "--overwrite"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "runtime")]))
    result = subprocess.run(
        [sys.executable, "-c", _INTERRUPTED_EXPORT, where, *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        cwd=ROOT,
    )
    assert result.returncode == 130, result.stderr[-3000:]
    assert result.stderr == "keras-primer export: interrupted: nothing written to --out\n"
    assert result.stdout == ""
    if fresh_out:
        assert not out.exists()
    else:
        assert {p: (out / p).read_bytes() for p in _tree(out) if (out / p).is_file()} == before
        assert sorted(set(os.listdir(out)) - {".lock"}) == ["onnx", "serving"]  # no staging


def _serving_request():
    import importlib.util

    path = os.path.join(ROOT, "export", "serving_request.py")
    spec = importlib.util.spec_from_file_location("serving_request", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once it is closed


@pytest.mark.parametrize("how", ["rest", "grpc", "bad_name"])
def test_serving_request_failures_are_one_line(capsys, how):
    # Issue 32: a closed REST or gRPC port, or `--model ../admin`, was a traceback.
    port = _closed_port()
    argv = {
        "rest": ["--port", str(port)],
        "grpc": ["--grpc", f"127.0.0.1:{port}"],
        "bad_name": ["--model", "../admin"],
    }[how]
    main = _serving_request().main
    assert main(argv + ["ROMEO:"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("serving_request.py: error: "), err
    expected = {
        "rest": f"No TF Serving answered at http://localhost:{port}/v1/models/primer:predict",
        "grpc": f"The gRPC request to 127.0.0.1:{port} failed (UNAVAILABLE: ",
        "bad_name": "`model_name` '../admin' is not a TF Serving model name",
    }[how]
    assert expected in err
    with pytest.raises(Exception):  # noqa: B017 (any: the traceback is the point)
        main(argv + ["ROMEO:", "--debug"])


def test_lock_message_names_the_kind_of_process_that_holds_it(tmp_path):
    # Issue 32: an export that found a training run's lock called it "another export".
    from keras_primer.training.run_dir import RunLock
    from keras_primer_cli.folder_lock import FolderLock, FolderLockedError

    with RunLock(str(tmp_path)):
        with pytest.raises(FolderLockedError, match=r"in use by another training process \(pid "):
            FolderLock(str(tmp_path), "export").acquire()
    with FolderLock(str(tmp_path), "export"):
        with pytest.raises(FolderLockedError, match=r"in use by another export \(pid "):
            RunLock(str(tmp_path)).acquire()
