"""Corpus loading, byte and SentencePiece tokenization, splits, streaming batches."""

import os

import numpy as np
import pytest

from keras_primer.data import (
    DataFileError,
    WindowDataset,
    list_text_files,
    load_splits,
    shakespeare_path,
    validation_arrays,
)
from keras_primer_runtime.generation import ByteCodec


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return str(path)


@pytest.mark.tensorflow_only
def test_missing_and_empty_data_give_clear_errors(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataFileError, match=r"not found: .*nope\.txt.*--data"):
        list_text_files(str(missing))
    empty = _write(str(tmp_path / "empty.txt"), "")
    with pytest.raises(DataFileError, match="empty"):
        list_text_files(empty)
    os.makedirs(tmp_path / "folder")
    _write(str(tmp_path / "folder" / "blank.txt"), "")
    with pytest.raises(DataFileError, match=r"No non-empty text files .*found 1 empty"):
        list_text_files(str(tmp_path / "folder"))


@pytest.mark.tensorflow_only
def test_shakespeare_path_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_PRIMER_SHAKESPEARE", str(tmp_path / "missing.txt"))
    with pytest.raises(DataFileError, match=r"\$KERAS_PRIMER_SHAKESPEARE points to .*missing\.txt"):
        shakespeare_path(download=False)
    monkeypatch.delenv("KERAS_PRIMER_SHAKESPEARE")
    with pytest.raises(DataFileError, match="no `--data` flag and no KERAS_PRIMER_SHAKESPEARE"):
        shakespeare_path(download=False)
    local = _write(str(tmp_path / "s.txt"), "ROMEO: hi\n")
    assert shakespeare_path(local, download=False) == local


@pytest.mark.tensorflow_only
def test_corpus_smaller_than_a_window_is_an_error(tmp_path):
    path = _write(str(tmp_path / "small.txt"), "x" * 100)
    with pytest.raises(DataFileError, match=r"too small: 100 tokens .*sequence_length=64"):
        load_splits(path, ByteCodec(), str(tmp_path / "cache"), sequence_length=64)


@pytest.mark.tensorflow_only
def test_folder_corpus_split_and_windows(tmp_path):
    _write(str(tmp_path / "c" / "a.txt"), "abcdefghij" * 10)
    _write(str(tmp_path / "c" / "sub" / "b.txt"), "0123456789" * 10)
    _write(str(tmp_path / "c" / "ignored.bin"), "zzzz")
    splits = load_splits(str(tmp_path / "c"), ByteCodec(), str(tmp_path / "cache"), 8, 0.2)
    # 100 + separator + 100 ids; the last 20% held out.
    assert len(splits.train) + len(splits.val) == 201
    assert len(splits.val) == 40
    assert int(splits.train[100]) == ByteCodec.end_id
    assert bytes(np.asarray(splits.val)).decode() == "0123456789" * 4
    assert splits.val_chars == 40
    x, y = validation_arrays(splits.val, 8, max_windows=3)
    assert x["token_ids"].shape == (3, 8) and y.shape == (3, 8)
    np.testing.assert_array_equal(x["token_ids"][:, 0], 2)
    np.testing.assert_array_equal(x["token_ids"][:, 1:], y[:, :-1])
    assert bytes(y[0].astype(np.uint8)).decode() == "01234567"


def test_window_dataset_is_a_function_of_the_global_step(tmp_path):
    tokens = np.arange(1000) % 256
    full = WindowDataset(tokens, 16, 4, num_steps=10, seed=3)
    resumed = WindowDataset(tokens, 16, 4, num_steps=4, start_step=6, seed=3)
    for i in range(4):
        np.testing.assert_array_equal(full[6 + i][1], resumed[i][1])
    assert not np.array_equal(full[0][1], full[1][1])
    x, y = full[0]
    assert x["token_ids"].dtype == np.int32 and x["token_ids"].shape == (4, 16)
    np.testing.assert_array_equal(x["token_ids"][:, 1:], y[:, :-1])
    with pytest.raises(IndexError):
        full[10]


@pytest.mark.tensorflow_only
def test_tf_dataset_matches_py_dataset():
    from keras_primer.data import to_tf_dataset

    ds = WindowDataset(np.arange(500) % 256, 8, 2, num_steps=3, seed=1)
    batches = list(to_tf_dataset(ds))
    assert len(batches) == 3
    np.testing.assert_array_equal(batches[2][1].numpy(), ds[2][1])


@pytest.mark.tensorflow_only
def test_sentencepiece_round_trip_and_model_tokenizer(tmp_path, sample_text_path):
    from keras_primer.data import train_sentencepiece
    from keras_primer.tokenizers import keras_tokenizer
    from keras_primer_runtime.generation import SentencePieceCodec

    text = open(sample_text_path, encoding="utf-8").read()
    # A comma in the path used to split it in two (`input="a,b"`).
    corpus = _write(str(tmp_path / "with,comma" / "s.txt"), text)
    codec = train_sentencepiece([corpus], 400, str(tmp_path / "sp.model"))
    assert codec.vocabulary_size == 400
    sample = "ROMEO:\nWhat  light,\n\n  é 你?\n"
    ids = codec.encode(sample)
    assert codec.decode(ids) == sample
    assert len(codec.encode(text)) < len(text) * 0.75  # merges, not characters
    tokenizer = keras_tokenizer(codec)
    assert tokenizer.start_token_id == 2 and tokenizer.end_token_id == 3
    assert tokenizer.pad_token_id == 0
    np.testing.assert_array_equal(np.asarray(tokenizer("ROMEO: What")), codec.encode("ROMEO: What"))
    reloaded = SentencePieceCodec(str(tmp_path / "sp.model"))
    assert reloaded.describe() == codec.describe()
    with pytest.raises(ValueError, match="at least 300"):
        train_sentencepiece([corpus], 100)


@pytest.mark.tensorflow_only
def test_sentencepiece_vocabulary_errors_give_the_size_that_works(tmp_path, shakespeare_path):
    # Issue 11 item 7: "Use a smaller vocabulary_size" when a larger one was needed.
    from keras_primer.data import train_sentencepiece

    with pytest.raises(
        ValueError, match=r"320 is too small .* need at least 325\. Pass --vocab-size 325"
    ):
        train_sentencepiece([shakespeare_path], 320)
    small = _write(str(tmp_path / "small.txt"), "to be or not to be\n" * 20)
    with pytest.raises(
        ValueError, match=r"too large for this corpus: it has at most \d+ distinct pieces"
    ):
        train_sentencepiece([small], 5000)


@pytest.mark.tensorflow_only
def test_token_cache_is_keyed_on_content_not_size_and_mtime(tmp_path):
    from keras_primer.data import encode_corpus

    path = _write(str(tmp_path / "c.txt"), "abcd" * 50)
    stat = os.stat(path)
    first = encode_corpus(path, ByteCodec(), str(tmp_path / "cache"))
    # Same size, same modification time, other bytes: must be tokenized again.
    _write(path, "wxyz" * 50)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = encode_corpus(path, ByteCodec(), str(tmp_path / "cache"))
    assert first["files"][0][2] != second["files"][0][2]
    tokens = np.fromfile(str(tmp_path / "cache" / "tokens.bin"), dtype=np.uint8)
    assert bytes(tokens[:4]).decode() == "wxyz"


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("damage", ["random bytes", "truncated", "no recorded hash"])
def test_damaged_token_cache_is_rebuilt_and_said_never_trained_on(tmp_path, damage):
    # Issue 20: random bytes of the same size were trained on (rc 0); a truncated
    # cache failed every rerun with "mmap length is greater than file size".
    import json

    path = _write(str(tmp_path / "c.txt"), "To be, or not to be: that is the question.\n" * 20)
    cache = tmp_path / "cache"
    notes = []
    good = np.array(load_splits(path, ByteCodec(), str(cache), 16, say=notes.append).train)
    assert notes == []
    bin_path = cache / "tokens.bin"
    if damage == "random bytes":
        bin_path.write_bytes(np.random.default_rng(0).bytes(bin_path.stat().st_size))
    elif damage == "truncated":
        bin_path.write_bytes(bin_path.read_bytes()[:100])
    else:  # a cache written before hashes were recorded
        meta = json.loads((cache / "tokens.json").read_text())
        del meta["sha256"]
        (cache / "tokens.json").write_text(json.dumps(meta))
    splits = load_splits(path, ByteCodec(), str(cache), 16, say=notes.append)
    np.testing.assert_array_equal(np.array(splits.train), good)
    (note,) = notes
    assert f"the token cache {bin_path}" in note and "rebuilding it from the corpus" in note
    # Rebuilt and recorded: the next reuse is silent.
    load_splits(path, ByteCodec(), str(cache), 16, say=notes.append)
    assert len(notes) == 1


@pytest.mark.tensorflow_only
def test_binary_file_is_not_a_corpus(tmp_path):
    from keras_primer.data import content_fingerprint

    text = _write(str(tmp_path / "ok.txt"), "plain text, caf\u00e9\n")
    stray = tmp_path / "latin1.txt"
    stray.write_bytes(("a few latin-1 bytes: caf\xe9 " * 20).encode("latin-1") + b"x" * 2000)
    assert len(content_fingerprint([text, str(stray)], text=True)) == 2  # a stray byte is text
    binary = tmp_path / "model.txt"
    binary.write_bytes(np.random.default_rng(0).bytes(4096).replace(b"\x00", b"\x01"))
    with pytest.raises(DataFileError, match=r"model\.txt is not text \(\d+ of its \d+ characters"):
        content_fingerprint([str(binary)], text=True)


@pytest.mark.tensorflow_only
def test_run_and_export_folders_inside_data_are_never_corpus(tmp_path):
    # Issue 32: a run folder inside --data fed its own samples.txt back as corpus.
    data = tmp_path / "data"
    _write(str(data / "a.txt"), "text\n")
    _write(str(data / "run" / "run.json"), '{"definition": {}, "steps": 2, "changes": []}')
    _write(str(data / "run" / "samples.txt"), "generated\n")
    _write(str(data / "ex" / "serving" / "models.config"), "model_config_list {}\n")
    _write(str(data / "ex" / "notes.txt"), "export notes\n")
    _write(str(data / "ex2" / "onnx" / "export_config.json"), "{}")
    _write(str(data / "ex2" / "readme.txt"), "export notes\n")
    _write(str(data / "mine" / "run.json"), "my own notes, not a run record")
    _write(str(data / "mine" / "b.txt"), "text\n")
    said = []
    files = list_text_files(str(data), say=said.append)
    assert [os.path.relpath(f, data) for f in files] == ["a.txt", os.path.join("mine", "b.txt")]
    (message,) = said
    assert "skips 3 folder(s) written by keras-primer" in message
    assert all(str(data / name) in message for name in ("run", "ex", "ex2"))
    assert list_text_files(str(data)) == files  # silent without `say`
    with pytest.raises(DataFileError, match=r"skipped 1 run or export folder"):
        list_text_files(str(data / "run"))


@pytest.mark.tensorflow_only
def test_symlinked_folders_are_followed_and_loops_skipped(tmp_path):
    # Issue 32: a symlinked sub-folder of --data was skipped without a word.
    data = tmp_path / "data"
    _write(str(data / "a.txt"), "text\n")
    _write(str(tmp_path / "elsewhere" / "b.txt"), "text\n")
    os.symlink(tmp_path / "elsewhere", data / "linked")
    os.symlink(tmp_path / "elsewhere", data / "linked_again")  # a second way in
    os.symlink(data, data / "loop")  # back up to the corpus itself
    os.symlink(tmp_path, data / "parent")  # a folder holding the corpus
    said = []
    files = list_text_files(str(data), say=said.append)
    assert [os.path.relpath(f, data) for f in files] == ["a.txt", os.path.join("linked", "b.txt")]
    (message,) = said
    assert "3 symlinked folder(s) leading to a folder it reads already" in message
    for name in ("linked_again", "loop", "parent"):
        assert str(data / name) in message


@pytest.mark.tensorflow_only
def test_sentencepiece_on_a_corpus_without_usable_lines_says_so(tmp_path):
    # Issue 32: a one-line corpus failed with SentencePiece's "[!sentences_.empty()]".
    pytest.importorskip("sentencepiece")
    from keras_primer.data import train_sentencepiece

    one_line = _write(str(tmp_path / "one_line.txt"), "word " * 2000 + "\n")
    with pytest.raises(ValueError) as raised:
        train_sentencepiece([one_line], 300)
    message = str(raised.value)
    assert message.startswith("Too little text for SentencePiece: the corpus (1 file(s))")
    assert "longer than 4192 bytes" in message and "--tokenizer bytes" in message
    assert "sentences_" not in message
