"""The data of a run (stages 3 and 6 of `driver.train`): its corpus, then its tokens.

`locate_corpus` finds the corpus files and their content hashes (part of
the run's definition); `prepare_data` makes the codec (a SentencePiece model
is trained once, on the corpus), reads the corpus into the run's verified
token cache and cuts the splits and the validation windows.
"""

from __future__ import annotations

import os

from keras_primer.data import (
    content_fingerprint,
    list_text_files,
    load_splits,
    shakespeare_path,
    validation_arrays,
)
from keras_primer.training.run_setup import Corpus, Run, note
from keras_primer_cli.run_config import RunConfig


def locate_corpus(config: RunConfig) -> Corpus:
    """The corpus files and their content hashes (Tiny Shakespeare by default).

    Raises:
        DataFileError: A file is missing, empty or not UTF-8 text.
    """
    data = config.data if config.data else shakespeare_path(None, download=config.download)
    path = os.path.abspath(os.path.expanduser(data))
    files = list_text_files(path, say=note)
    root = path if os.path.isdir(path) else os.path.dirname(path)
    fingerprint = [
        [os.path.relpath(f, root), size, sha]
        for f, size, sha in content_fingerprint(files, text=True)
    ]
    return Corpus(path, files, fingerprint)


def prepare_data(run: Run) -> None:
    """Sets `run.codec`, `run.splits` and `run.val`: tokenizes the corpus (or
    reuses its verified token cache) and cuts the validation windows."""
    run.codec = run.tokenizer.make_codec(run.corpus, run.out, seed=run.config.seed)
    run.splits = load_splits(
        run.corpus.path,
        run.codec,
        run.path("data"),
        run.preset.sequence_length,
        run.config.val_fraction,
        fingerprint=run.corpus.fingerprint,
        say=note,
    )
    run.val = validation_arrays(
        run.splits.val, run.preset.sequence_length, run.preset.eval_windows, run.splits.start_id
    )
