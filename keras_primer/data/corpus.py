"""Finding and reading text corpora: one file, a folder of files, Tiny Shakespeare.

Nothing here imports TensorFlow. Corpora are read in chunks
(`iter_text_chunks`) so they never need to fit in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

from keras_primer_cli.ownership import is_export_folder, is_run_folder

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_ENV = "KERAS_PRIMER_SHAKESPEARE"
DEFAULT_EXTENSIONS = (".txt", ".text", ".md")


class DataFileError(ValueError):
    """A corpus path is missing, empty or holds no usable text."""


def shakespeare_path(data: str | None = None, download: bool = True) -> str:
    """Path of Tiny Shakespeare: `data`, else `$KERAS_PRIMER_SHAKESPEARE`, else a download.

    Args:
        data: An explicit local copy (a `--data` flag). Takes precedence.
        download: Fetch the public copy with `keras.utils.get_file` (cached in
            `~/.keras/datasets`) when neither `data` nor the environment
            variable is given. Tests and CI pass `download=False`.

    Returns:
        The absolute path of an existing, non-empty file.

    Raises:
        DataFileError: The file given by `data` or the environment variable
            does not exist or is empty, or `download=False` and nothing was
            given. The message says where it looked and how to point elsewhere.
    """
    looked = []
    for source, path in (
        ("--data", data),
        (f"${SHAKESPEARE_ENV}", os.environ.get(SHAKESPEARE_ENV)),
    ):
        if not path:
            continue
        path = os.path.abspath(os.path.expanduser(path))
        looked.append(f"{source}={path}")
        if not os.path.exists(path):
            raise DataFileError(
                f"Tiny Shakespeare not found: {source} points to {path}, which does "
                f"not exist. Pass `--data /path/to/tinyshakespeare.txt` or set "
                f"{SHAKESPEARE_ENV} to a local copy (download it from {SHAKESPEARE_URL})."
            )
        check_text_file(path)
        return path
    if not download:
        raise DataFileError(
            "Tiny Shakespeare not found: no `--data` flag and no "
            f"{SHAKESPEARE_ENV} environment variable, and downloading is off. "
            f"Pass `--data /path/to/tinyshakespeare.txt` or set {SHAKESPEARE_ENV} "
            f"to a local copy of {SHAKESPEARE_URL}."
        )
    import keras

    try:
        path = keras.utils.get_file("tinyshakespeare.txt", origin=SHAKESPEARE_URL)
    except Exception as e:  # network errors come in many types
        raise DataFileError(
            f"Could not download Tiny Shakespeare from {SHAKESPEARE_URL} ({e}). "
            f"Pass `--data /path/to/tinyshakespeare.txt` or set {SHAKESPEARE_ENV} "
            "to a local copy."
        ) from e
    check_text_file(path)
    return path


def check_text_file(path: str) -> None:
    """Raises `DataFileError` unless `path` is an existing, non-empty file."""
    if not os.path.exists(path):
        raise DataFileError(
            f"Data file not found: {path}. Pass an existing text file or a folder "
            "of text files with `--data`."
        )
    if not os.path.isfile(path):
        raise DataFileError(f"Expected a regular file, got {path}.")
    if os.path.getsize(path) == 0:
        raise DataFileError(f"Data file is empty: {path}. A corpus needs some text.")


def list_text_files(
    path: str, extensions: tuple[str, ...] = DEFAULT_EXTENSIONS, say=None
) -> list[str]:
    """The text files of a corpus: `path` itself, or the files under a folder.

    A folder is searched recursively for files ending in one of `extensions`
    (hidden files and folders are skipped); the result is sorted so that the
    train/validation split is reproducible. Empty files are skipped, but a
    corpus with no text at all is an error.

    What keras-primer writes is never corpus: a run folder (our `run.json`:
    its `samples.txt` would become training text, and the run a different
    run on its next start) and an export folder are skipped. Symlinked
    folders are followed; one that leads to a folder read already (a loop,
    or a second link to it) is skipped. `say(message)`, when given, is told
    once what was skipped.

    Raises:
        DataFileError: `path` does not exist, is an empty file, or is a folder
            with no non-empty file matching `extensions`.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise DataFileError(
            f"Data path not found: {path}. Pass an existing text file or a folder "
            "of text files with `--data`."
        )
    if os.path.isfile(path):
        check_text_file(path)
        return [path]
    files, empty, ours, repeated = [], [], [], []
    seen = {os.path.realpath(path)}  # folders read or queued, resolved
    for root, dirs, names in os.walk(path, followlinks=True):
        if is_run_folder(root) or is_export_folder(root):
            ours.append(root)
            dirs[:] = []
            continue
        kept = []
        # Real folders first, so that a link to one of them is the one skipped.
        for d in sorted(dirs, key=lambda d: (os.path.islink(os.path.join(root, d)), d)):
            if d.startswith("."):
                continue
            target = os.path.realpath(os.path.join(root, d))
            if target in seen or _holds(target, os.path.realpath(root)):
                repeated.append(os.path.join(root, d))  # a loop, or a second way in
                continue
            seen.add(target)
            kept.append(d)
        dirs[:] = sorted(kept)
        for name in sorted(names):
            if name.startswith(".") or not name.lower().endswith(tuple(extensions)):
                continue
            full = os.path.join(root, name)
            (files if os.path.getsize(full) > 0 else empty).append(full)
    if say and (ours or repeated):
        skipped = []
        if ours:
            skipped.append(
                f"{len(ours)} folder(s) written by keras-primer (run folders and exports, "
                f"never corpus): {', '.join(ours)}"
            )
        if repeated:
            skipped.append(
                f"{len(repeated)} symlinked folder(s) leading to a folder it reads already "
                f"(a loop, or a second link): {', '.join(repeated)}"
            )
        say(f"--data {path} skips " + "; and ".join(skipped) + ".")
    if not files:
        raise DataFileError(
            f"No non-empty text files under {path} (looked for names ending in "
            f"{', '.join(extensions)}; found {len(empty)} empty"
            + (f"; skipped {len(ours)} run or export folder(s)" if ours else "")
            + "). Pass a text file or a folder that holds some."
        )
    return sorted(files)


def _holds(folder: str, path: str) -> bool:
    """Whether the resolved `folder` is the resolved `path` or a folder above it."""
    return os.path.commonpath([folder, path]) == folder


def iter_text_chunks(files: list[str], chunk_chars: int = 1 << 20) -> Iterator[tuple[int, str]]:
    """Yields `(file_index, text)` pieces of about `chunk_chars` characters.

    Pieces end at line ends where possible, so a tokenizer never sees a word
    cut in two (a single line longer than `chunk_chars` is yielded whole).
    Files are decoded as UTF-8; undecodable bytes become U+FFFD.
    """
    for index, name in enumerate(files):
        with open(name, encoding="utf-8", errors="replace", newline="") as f:
            pending = []
            size = 0
            for line in f:
                pending.append(line)
                size += len(line)
                if size >= chunk_chars:
                    yield index, "".join(pending)
                    pending, size = [], 0
            if pending:
                yield index, "".join(pending)


def read_text(path: str) -> str:
    """The whole corpus at `path` (file or folder) as one string, documents
    separated by a blank line. For small corpora and tests; training streams."""
    files = list_text_files(path)
    parts = []
    for name in files:
        with open(name, encoding="utf-8", errors="replace", newline="") as f:
            parts.append(f.read())
    return "\n\n".join(parts)
