"""`keras-primer export` as a command: checks before writing, atomic results,
safe names, merged `models.config`, one-line errors with exit code 2.

The SavedModel and ONNX writers are replaced by small fakes here (their own
tests export for real); what is tested is what the command does around them.
"""

import os

import pytest

from keras_primer_runtime import export_cli

pytestmark = pytest.mark.tensorflow_only


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

    state = {"fail": None, "calls": []}

    def fake_saved_model(model, base_dir, model_name, version, default_max_new_tokens=32):
        version_dir = os.path.join(base_dir, model_name, str(version))
        os.makedirs(os.path.join(version_dir, "variables"))
        with open(os.path.join(version_dir, "saved_model.pb"), "w") as f:
            f.write(f"v{version} max_new_tokens={default_max_new_tokens}")
        state["calls"].append(("saved_model", model_name, version))
        if state["fail"] == "saved_model":
            raise OSError(28, "No space left on device", os.path.join(version_dir, "variables"))
        with open(os.path.join(base_dir, "models.config"), "w") as f:
            f.write(saved_model.models_config(model_name, f"/models/{model_name}"))
        return version_dir

    def fake_onnx(model, out_dir, int8=False):
        os.makedirs(out_dir)
        path = os.path.join(out_dir, "model.onnx")
        with open(path, "w") as f:
            f.write("onnx")
        state["calls"].append(("onnx", int8))
        if state["fail"] == "onnx":
            raise RuntimeError("tf2onnx could not convert the decoder step")
        return {"model": path}

    monkeypatch.setattr(saved_model, "export_saved_model", fake_saved_model)
    monkeypatch.setattr(onnx_export, "export_onnx", fake_onnx)
    return state


def _run(capsys, *argv):
    from keras_primer_runtime.export_cli import main

    status = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _tree(root):
    return sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, dirs, files in os.walk(root)
        for f in files + dirs
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
    config = export_cli.read_models_config((out / "serving" / "models.config").read_text())
    assert [(c.name, c.base_path) for c in config.model_config_list.config] == [
        ("tiny", "/models/tiny"),
        ("other", "/models/other"),
    ]
    assert sorted(os.listdir(out)) == ["onnx", "serving"]  # no temporary folder left


def test_existing_version_needs_overwrite(model_path, fakes, tmp_path, capsys):
    out = tmp_path / "out"
    assert _run(capsys, model_path, "--out", out, "--name", "m", "--max-new-tokens", 3)[0] == 0
    before = _tree(out)
    status, _, err = _run(capsys, model_path, "--out", out, "--name", "m")
    assert status == 2 and "already exists: pass --overwrite" in err and err.count("\n") == 1
    assert _tree(out) == before and len(fakes["calls"]) == 2  # refused before any work
    status, _, err = _run(capsys, model_path, "--out", out, "--name", "m", "--overwrite")
    assert status == 0, err
    assert (out / "serving" / "m" / "1" / "saved_model.pb").read_text() == "v1 max_new_tokens=30"
    assert _tree(out) == before


@pytest.mark.parametrize("where", ["saved_model", "onnx"])
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
    assert ("No space left" in err) if where == "saved_model" else ("tf2onnx" in err)
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
        ((model_path, "--out", out, "--version", 0), "--version must be an integer >= 1"),
        ((model_path, "--out", out, "--max-new-tokens", 0), "--max-new-tokens must be at least 1"),
        ((model_path, "--out", out, "--no-onnx", "--no-saved-model"), "nothing to export"),
    ]
    for argv, expected in cases:
        status, stdout, err = _run(capsys, *argv)
        assert status == 2 and expected in err and err.count("\n") == 1, (argv, err)
        assert err.startswith("keras-primer export: error: ")
    assert not out.exists() and not fakes["calls"]
    with pytest.raises(export_cli.ExportError):
        _run(capsys, not_zip, "--out", out, "--debug")


def test_models_config_merge_escapes_and_keeps_entries():
    existing = (
        'model_config_list { config { name: "old" base_path: "/srv/old" '
        'model_platform: "tensorflow" model_version_policy { all {} } } }'
    )
    new = 'model_config_list { config { name: "a\\"b" base_path: "/models/a\\"b" model_platform: "tensorflow" } }'
    merged = export_cli.merge_models_config(existing, new)
    again = export_cli.merge_models_config(merged, new)
    assert again == merged
    config = export_cli.read_models_config(merged)
    assert [c.name for c in config.model_config_list.config] == ["old", 'a"b']
    assert config.model_config_list.config[0].model_version_policy.HasField("all")
    assert 'name: "a\\"b"' in merged
    with pytest.raises(export_cli.ExportError, match="not a TF Serving model config"):
        export_cli.merge_models_config("model_config_list { oops", new, "/x/models.config")


def test_unreadable_models_config_is_refused_before_writing(model_path, fakes, tmp_path, capsys):
    (tmp_path / "out" / "serving").mkdir(parents=True)
    (tmp_path / "out" / "serving" / "models.config").write_text("this is not a proto {")
    status, _, err = _run(capsys, model_path, "--out", tmp_path / "out", "--name", "m")
    assert status == 2 and "models.config is not a TF Serving model config" in err
    assert not fakes["calls"]


def test_export_model_api_raises_export_error(model_path, tmp_path):
    from keras_primer.export import export_model

    with pytest.raises(export_cli.ExportError, match="is not a TF Serving model name"):
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
