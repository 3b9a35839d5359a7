"""Token files, train/validation splits and streaming batches of windows.

The corpus is tokenized once, chunk by chunk, into a flat binary file of ids
(`tokens.bin`, like nanoGPT's `train.bin`) that is then memory-mapped: the
corpus never has to fit in memory. `WindowDataset` (a `keras.utils.PyDataset`,
so it works on the TensorFlow, JAX and PyTorch backends) draws random
windows; `to_tf_dataset` wraps it in `tf.data` for TensorFlow users.

Every window starts with the start id, like a `generate()` prompt:
`token_ids = [start, t[o], ..., t[o+L-2]]`, `labels = [t[o], ..., t[o+L-1]]`
for a window of `L = sequence_length` ids at offset `o`.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass

import keras
import numpy as np

from keras_primer.data.corpus import DataFileError, iter_text_chunks, list_text_files


@dataclass
class TokenSplits:
    """Memory-mapped train and validation ids of a corpus.

    Attributes:
        train: 1-D ids of the training split.
        val: 1-D ids of the held-out split (the last `val_fraction` of the
            corpus).
        val_chars: Characters of text the validation ids encode (for bits per
            character).
        vocabulary_size: Size of the codec's vocabulary.
        start_id: Id put in front of every window.
    """

    train: np.ndarray
    val: np.ndarray
    val_chars: int
    vocabulary_size: int
    start_id: int

    @property
    def val_tokens_per_char(self) -> float:
        return len(self.val) / max(self.val_chars, 1)


# A text file holds no NUL byte, and at most this share of its characters
# are bytes that are not UTF-8 (read as U+FFFD); anything else is binary.
MAX_NON_UTF8_SHARE = 0.01


def content_fingerprint(files: list[str], text: bool = False) -> list:
    """`[path, bytes, sha256]` per file: what the token cache is keyed on.

    Content, not modification times: a file rewritten within the same second
    with the same size still gets a new key.

    Args:
        files: The files.
        text: Also check, in the same pass, that each file is text (no NUL
            byte, at most `MAX_NON_UTF8_SHARE` of it not UTF-8).

    Raises:
        DataFileError: `text` and a file is binary; the message names it.
    """
    out = []
    for name in files:
        digest = hashlib.sha256()
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        chars = bad = 0
        nul = False
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
                if text:
                    nul = nul or b"\x00" in block
                    decoded = decoder.decode(block)
                    chars += len(decoded)
                    bad += decoded.count("\ufffd")
        if text:
            decoded = decoder.decode(b"", final=True)
            chars += len(decoded)
            bad += decoded.count("\ufffd")
            if nul or bad > MAX_NON_UTF8_SHARE * max(chars, 1):
                why = (
                    "it holds NUL bytes"
                    if nul
                    else f"{bad} of its {chars} characters are not UTF-8"
                )
                raise DataFileError(
                    f"--data file {name} is not text ({why}); it looks binary. Pass UTF-8 "
                    "text files (a file, or a folder of .txt/.text/.md files) with --data."
                )
        out.append([name, os.path.getsize(name), digest.hexdigest()])
    return out


def encode_corpus(
    path: str,
    codec,
    cache_dir: str,
    chunk_chars: int = 1 << 20,
    fingerprint: list | None = None,
    say=None,
) -> dict:
    """Tokenizes the corpus at `path` into `cache_dir/tokens.bin`, streaming.

    Documents (files) are separated by the codec's end id. Reuses an existing
    `tokens.bin` when the files' contents and the codec are unchanged
    (`fingerprint`: `content_fingerprint(files)` when the caller has it) and
    the file itself is intact: its length and SHA-256, recorded when it was
    written, are checked on every reuse (`check_token_cache`). A cache that
    fails the check is rebuilt, and `say` says so.

    Returns:
        The metadata dict written to `cache_dir/tokens.json`: `num_tokens`,
        `dtype`, `sha256` (of `tokens.bin`), cumulative `chunks`
        `[tokens, chars]` (to count the characters of any split), `codec`
        and `files`.
    """
    say = say or _note
    files = list_text_files(path)
    os.makedirs(cache_dir, exist_ok=True)
    bin_path = os.path.join(cache_dir, "tokens.bin")
    meta_path = os.path.join(cache_dir, "tokens.json")
    fingerprint = (
        [[f, *rest] for f, (_, *rest) in zip(files, fingerprint)]
        if fingerprint
        else (content_fingerprint(files))
    )
    if os.path.exists(meta_path) and os.path.exists(bin_path):
        meta = _read_json(meta_path)
        if meta is None:
            say(f"the token cache's record {meta_path} is unreadable; rebuilding {bin_path}.")
        elif meta.get("files") == fingerprint and meta.get("codec") == codec.describe():
            problem = check_token_cache(bin_path, meta)
            if problem is None:
                return meta
            say(f"the token cache {bin_path} {problem}; rebuilding it from the corpus.")
    dtype = np.dtype(codec.token_dtype)
    num_tokens, num_chars = 0, 0
    chunks = [[0, 0]]
    previous_file = 0
    digest = hashlib.sha256()
    with open(bin_path + ".tmp", "wb") as out:
        for file_index, text in iter_text_chunks(files, chunk_chars):
            if file_index != previous_file:
                ids = np.asarray([codec.end_id], dtype)
                ids.tofile(out)
                digest.update(ids.tobytes())
                num_tokens += 1
                previous_file = file_index
            ids = codec.encode(text).astype(dtype, copy=False)
            ids.tofile(out)
            digest.update(ids.tobytes())
            num_tokens += len(ids)
            num_chars += len(text)
            chunks.append([num_tokens, num_chars])
    os.replace(bin_path + ".tmp", bin_path)
    meta = {
        "num_tokens": num_tokens,
        "dtype": dtype.name,
        "sha256": digest.hexdigest(),
        "chunks": chunks,
        "codec": codec.describe(),
        "files": fingerprint,
    }
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(meta_path + ".tmp", meta_path)
    return meta


def check_token_cache(bin_path: str, meta: dict) -> str | None:
    """None if `bin_path` holds exactly the ids `meta` (its `tokens.json`)
    records, by length and SHA-256; else what is wrong (for a message)."""
    try:
        expected = int(meta["num_tokens"]) * np.dtype(meta["dtype"]).itemsize
        recorded = meta["sha256"]
    except (KeyError, TypeError, ValueError):
        return "has no recorded length and hash (written by an older keras-primer)"
    size = os.path.getsize(bin_path)
    if size != expected:
        return f"holds {size} bytes, not the {expected} recorded with it (truncated or replaced)"
    digest = hashlib.sha256()
    with open(bin_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != recorded:
        return "does not match the SHA-256 recorded with it (changed since it was written)"
    return None


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _note(message: str) -> None:
    print(f"keras-primer: note: {message}", file=sys.stderr)


def _chars_before(chunks: list, token_index: int) -> float:
    """Characters encoded by the first `token_index` ids (linear within a chunk)."""
    tokens = np.asarray([c[0] for c in chunks], dtype=np.float64)
    chars = np.asarray([c[1] for c in chunks], dtype=np.float64)
    return float(np.interp(token_index, tokens, chars))


def load_splits(
    path: str,
    codec,
    cache_dir: str,
    sequence_length: int,
    val_fraction: float = 0.1,
    fingerprint: list | None = None,
    say=None,
) -> TokenSplits:
    """Tokenizes (or reuses) the corpus and splits it into train and validation.

    Args:
        path: A text file or a folder of text files.
        codec: `ByteCodec` or `SentencePieceCodec`.
        cache_dir: Where `tokens.bin` lives.
        sequence_length: Ids per training window.
        val_fraction: Share of the corpus (its end) held out, in (0, 0.5].
        fingerprint: The files' content fingerprint, if already computed.
        say: Where a rebuilt token cache is said (default: stderr).

    Raises:
        DataFileError: The corpus is missing or empty, or either split holds
            fewer than `sequence_length` ids (a corpus smaller than one
            context window); the message gives the sizes.
    """
    if not 0.0 < val_fraction <= 0.5:
        raise ValueError(f"`val_fraction` must be in (0, 0.5]. Received: {val_fraction}.")
    if sequence_length < 2:
        raise ValueError(f"`sequence_length` must be at least 2. Received: {sequence_length}.")
    meta = encode_corpus(path, codec, cache_dir, fingerprint=fingerprint, say=say)
    n = meta["num_tokens"]
    if n == 0:
        raise DataFileError(f"The corpus at {path} encodes to no tokens.")
    tokens = np.memmap(
        os.path.join(cache_dir, "tokens.bin"), dtype=meta["dtype"], mode="r", shape=(n,)
    )
    split = int(round(n * (1.0 - val_fraction)))
    train, val = tokens[:split], tokens[split:]
    for name, part in (("training", train), ("validation", val)):
        if len(part) < sequence_length:
            raise DataFileError(
                f"The corpus at {path} is too small: {n} tokens in all, {len(part)} "
                f"in the {name} split (val_fraction={val_fraction}), fewer than one "
                f"context window of sequence_length={sequence_length}. Use more text, "
                "a shorter sequence length, or another val_fraction."
            )
    val_chars = meta["chunks"][-1][1] - _chars_before(meta["chunks"], split)
    return TokenSplits(
        train=train,
        val=val,
        val_chars=int(round(val_chars)),
        vocabulary_size=codec.vocabulary_size,
        start_id=codec.start_id,
    )


def make_windows(tokens: np.ndarray, offsets: np.ndarray, sequence_length: int, start_id: int):
    """`(x, y)` for windows of `tokens` starting at `offsets` (see module doc)."""
    index = offsets[:, None] + np.arange(sequence_length)[None, :]
    labels = np.asarray(tokens[index], dtype=np.int32)
    token_ids = np.empty_like(labels)
    token_ids[:, 0] = start_id
    token_ids[:, 1:] = labels[:, :-1]
    x = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return x, labels


class WindowDataset(keras.utils.PyDataset):
    """Batches of random windows, a pure function of `(seed, global step)`.

    Batch `i` of this dataset is the batch of global step `start_step + i`,
    whatever happened before, so a resumed run sees exactly the batches an
    uninterrupted run would have seen.

    Args:
        tokens: 1-D ids (a memory map is fine).
        sequence_length: Ids per window.
        batch_size: Windows per batch.
        num_steps: Batches in the dataset (`len()`).
        start_step: Global step of batch 0.
        seed: Sampling seed.
        start_id: Id put in front of every window.
        shard: `(index, count)`: yield only rows `index` of `count` equal
            parts of every batch (a process's share in multi-host training;
            the parts of all processes make up the one-process batch).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        sequence_length: int,
        batch_size: int,
        num_steps: int,
        start_step: int = 0,
        seed: int = 0,
        start_id: int = 2,
        shard: tuple[int, int] = (0, 1),
        **kwargs,
    ):
        super().__init__(**kwargs)
        if len(tokens) < sequence_length:
            raise ValueError(
                f"{len(tokens)} tokens are fewer than one window of "
                f"sequence_length={sequence_length}."
            )
        if num_steps < 1 or batch_size < 1:
            raise ValueError(
                f"`num_steps` and `batch_size` must be positive. Received: "
                f"num_steps={num_steps}, batch_size={batch_size}."
            )
        index, count = shard
        if batch_size % count or not 0 <= index < count:
            raise ValueError(
                f"Cannot take part {index} of {count} of a batch of {batch_size}: the "
                "batch size must divide by the number of parts."
            )
        self.shard = (index, count)
        self.tokens = tokens
        self.sequence_length = sequence_length
        self.batch_size = batch_size
        self.num_steps = num_steps
        self.start_step = start_step
        self.seed = seed
        self.start_id = start_id

    def __len__(self) -> int:
        return self.num_steps

    def offsets(self, step: int) -> np.ndarray:
        """Window offsets of global step `step`."""
        rng = np.random.default_rng([self.seed, step])
        high = len(self.tokens) - self.sequence_length + 1
        return rng.integers(0, high, size=self.batch_size)

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_steps:
            raise IndexError(f"Batch {index} out of range [0, {self.num_steps}).")
        offsets = self.offsets(self.start_step + index)
        part, parts = self.shard
        rows = self.batch_size // parts
        offsets = offsets[part * rows : (part + 1) * rows]
        return make_windows(self.tokens, offsets, self.sequence_length, self.start_id)


def validation_arrays(
    tokens: np.ndarray, sequence_length: int, max_windows: int, start_id: int = 2
):
    """Non-overlapping validation windows, spread over the whole split.

    Returns `(x, y)` NumPy arrays of `min(max_windows, len // sequence_length)`
    windows (evenly spaced when there are more).
    """
    count = len(tokens) // sequence_length
    if count < 1:
        raise ValueError(
            f"The validation split ({len(tokens)} tokens) is smaller than one "
            f"window of sequence_length={sequence_length}."
        )
    starts = np.arange(count) * sequence_length
    if count > max_windows:
        starts = starts[np.linspace(0, count - 1, max_windows).round().astype(int)]
    return make_windows(tokens, starts, sequence_length, start_id)


def to_tf_dataset(dataset: WindowDataset):
    """`dataset` as a `tf.data.Dataset` (TensorFlow backend or `tf.distribute`).

    The batches are the same as the PyDataset's; the dataset is prefetched.
    """
    import tensorflow as tf

    # Static shapes: tf.distribute splits the batch over replicas by them.
    shape = [dataset.batch_size // dataset.shard[1], dataset.sequence_length]
    spec = (
        {
            "token_ids": tf.TensorSpec(shape, tf.int32),
            "padding_mask": tf.TensorSpec(shape, tf.int32),
        },
        tf.TensorSpec(shape, tf.int32),
    )

    def generator():
        for i in range(len(dataset)):
            yield dataset[i]

    return tf.data.Dataset.from_generator(generator, output_signature=spec).prefetch(2)


def bits_per_character(loss_nats: float, tokens_per_char: float) -> float:
    """Mean cross-entropy per token (nats) to bits per character of text."""
    return float(loss_nats) * float(tokens_per_char) / math.log(2.0)
