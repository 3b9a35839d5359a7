"""ONNX Runtime serving: an export folder is checked before it is served,
streaming ends with `generate`'s text, and the decoding step's past grows
with the tokens so far (not with a buffer sized for the request). One
family here; every family's stream and past growth: test_generation_parity."""

import json
import os
import shutil

import numpy as np
import pytest
from export_helpers import make_lm, sentencepiece_proto

pytestmark = [pytest.mark.tensorflow_only, pytest.mark.slow]


def _export(root, family, tokenizer, name):
    from keras_primer.export import export_model

    lm = make_lm(family, tokenizer)
    path = str(root / f"{name}.keras")
    lm.save(path)
    export_model(path, str(root / name), saved_model=False)
    return lm, str(root / name / "onnx")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("ort_serving")
    out = {}
    for name, family, tokenizer in (
        ("primer_bytes", "primer", "bytes"),
        ("primer_sp", "primer", "sentencepiece"),
    ):
        out[name] = _export(root, family, tokenizer, name)
    return out


def _copy(folder, tmp_path, name="copy"):
    target = tmp_path / name
    shutil.copytree(folder, target)
    return target


def _generator(folder):
    from keras_primer_runtime import OrtGenerator

    return OrtGenerator(str(folder))


# === The folder is checked before it is served ===


def test_swapped_tokenizer_files_are_refused_by_name(exports, tmp_path):
    from keras_primer_runtime.export_folder import ExportFolderError

    _, sp_dir = exports["primer_sp"]
    _, byte_dir = exports["primer_bytes"]
    # The byte tokenizer's description copied into a SentencePiece export.
    swapped = _copy(sp_dir, tmp_path, "bytes_in_sp")
    shutil.copy(os.path.join(byte_dir, "tokenizer.json"), swapped / "tokenizer.json")
    with pytest.raises(
        ExportFolderError, match=r"tokenizer\.json is not the file that was exported"
    ):
        _generator(swapped)
    # Another SentencePiece model (310 pieces) in the 320-piece export.
    other = _copy(sp_dir, tmp_path, "other_sp")
    (other / "tokenizer.model").write_bytes(sentencepiece_proto(vocabulary_size=310))
    with pytest.raises(ExportFolderError, match=r"tokenizer\.model is not the file"):
        _generator(other)
    missing = _copy(sp_dir, tmp_path, "missing_sp")
    (missing / "tokenizer.model").unlink()
    with pytest.raises(ExportFolderError, match=r"tokenizer\.model is missing"):
        _generator(missing)


def test_edited_config_is_refused(exports, tmp_path):
    """A raised max_sequence_length (Feedback would generate past the model's
    length, Primer fail inside ORT) or renamed state tensors are refused: each
    graph carries the sizes it was built with."""
    from keras_primer_runtime.export_folder import ExportFolderError

    _, folder = exports["primer_bytes"]
    edited = _copy(folder, tmp_path)
    config = json.loads((edited / "export_config.json").read_text())
    config["max_sequence_length"] *= 4
    (edited / "export_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFolderError, match="differ in max_sequence_length"):
        _generator(edited)
    config = json.loads((_copy(folder, tmp_path, "renamed") / "export_config.json").read_text())
    config["states"][0]["past"] = "renamed"
    (tmp_path / "renamed" / "export_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFolderError, match="differ in states"):
        _generator(tmp_path / "renamed")


def test_unreadable_or_foreign_config_is_refused(exports, tmp_path):
    from keras_primer_runtime.export_folder import ExportFolderError

    _, folder = exports["primer_bytes"]
    broken = _copy(folder, tmp_path)
    (broken / "export_config.json").write_text("{not json")
    with pytest.raises(ExportFolderError, match="export_config.json is not valid JSON"):
        _generator(broken)
    old = _copy(folder, tmp_path, "old")
    config = json.loads((old / "export_config.json").read_text())
    del config["format"]
    (old / "export_config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFolderError, match="of format None; this runtime runs format"):
        _generator(old)
    with pytest.raises(ExportFolderError, match="is not a keras-primer ONNX export"):
        _generator(tmp_path)
    graph = _copy(folder, tmp_path, "graph")
    (graph / "decoder_step.onnx").write_bytes(b"not a graph")
    with pytest.raises(ExportFolderError, match=r"decoder_step\.onnx is not the file"):
        _generator(graph)


# === Streaming ===


@pytest.mark.parametrize("name", ["primer_bytes", "primer_sp"])
@pytest.mark.parametrize("options", [{}, {"temperature": 1.0, "top_k": 20, "seed": 3}])
def test_stream_ends_with_generate_text(exports, name, options):
    generator = _generator(exports[name][1])
    for prompt in ("ROMEO:", "café 你好"):
        pieces = list(generator.stream(prompt, max_new_tokens=12, **options))
        text = generator.generate(prompt, max_new_tokens=12, **options)
        assert "".join(pieces) == text
        assert pieces[0].startswith(prompt[:1]) and len(pieces) >= 2


def test_stream_holds_back_an_unfinished_character(exports, monkeypatch):
    """A byte model may emit the first bytes of a UTF-8 character: no piece
    shows them as U+FFFD before the character is complete."""
    generator = _generator(exports["primer_bytes"][1])
    # Emit "é" (0xC3 0xA9) and "你" (0xE4 0xBD 0xA0) byte by byte, then stop.
    wanted = iter([0xC3, 0xA9, 0x41, 0xE4, 0xBD, 0xA0, 3])

    def choose(logits, options, rng):
        return np.full(logits.shape[0], next(wanted))

    from keras_primer_runtime import generation

    monkeypatch.setattr(generation, "choose_next", choose)
    pieces = list(generator.stream("Hi", max_new_tokens=10))
    assert "".join(pieces) == "HiéA你"
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[-2:] == ["A", "你"] or pieces[-1].endswith("你")


def test_stream_takes_one_prompt(exports):
    generator = _generator(exports["primer_bytes"][1])
    with pytest.raises(ValueError, match="one prompt"):
        list(generator.stream(["a", "b"]))


# === The past grows with the tokens so far ===


def test_step_past_grows_by_each_steps_tokens(exports):
    """The step's state holds exactly the positions so far, whatever the
    model's max_sequence_length; prefill + steps equal the full pass."""
    import keras

    lm, folder = exports["primer_bytes"]
    generator = _generator(folder)
    ids = np.array([[2, 72, 105, 33, 44, 55, 66]], np.int32)
    state = generator.empty_state(1)
    logits, state = generator.step(ids[:, :4], 0, state)
    for position in range(4, ids.shape[1]):
        grown = {
            t["past"]: state[t["past"]].shape()[t["shape"].index("length")]
            for t in generator.state_tensors
            if "length" in t["shape"]
        }
        assert grown and set(grown.values()) == {position}, grown
        logits, state = generator.step(ids[:, position : position + 1], position, state)
    full = keras.ops.convert_to_numpy(lm({"token_ids": ids, "padding_mask": np.ones_like(ids)}))
    np.testing.assert_allclose(logits, full[:, -1], atol=1e-4, rtol=0)
