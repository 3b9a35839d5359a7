"""Time to quality: our models against keras-hub GPT-2 on the same budget and seed.

Every model trains through the same `train()` pipeline: the same corpus,
tokenizer, batches (a function of the seed and the step alone), optimizer,
schedule, precision, evaluation windows and seed. The reference is keras-hub's
`GPT2CausalLM` of the same size (`gpt2`, random weights) when it is among the
models, else our Transformer baseline, else the Feedback Transformer (the
baseline of Feedback + MDHA). For every model the report gives the
steps and the wall-clock seconds it needs to reach the reference's final
validation loss, and those as fractions of the reference's own steps and
seconds (`step_ratio`, `time_ratio`).

With several seeds (`seeds=`), each model trains once per seed and the report
gives every seed's figures and their mean, standard deviation and range: one
seed's ratio moves by tens of percent on small runs, so a single number is no
claim. The report (rows, tables, plots) is `compare_report`'s.
"""

from __future__ import annotations

import dataclasses
import json
import os

from keras_primer.data import list_text_files, shakespeare_path, train_sentencepiece
from keras_primer.training.compare_report import BASELINE, REFERENCE, report, report_seeds
from keras_primer.training.driver import train
from keras_primer_cli.model_registry import MODELS
from keras_primer_cli.run_config import RunConfig
from keras_primer_runtime.generation import SentencePieceCodec

DEFAULT_MODELS = (REFERENCE, "primer_ez", BASELINE, "feedback")


def run_dir(out: str, model: str, seed: int | None = None) -> str:
    """`<out>/<model>/`, or `<out>/<model>/seed-<seed>/` in a several-seed comparison."""
    path = os.path.join(out, model)
    return path if seed is None else os.path.join(path, f"seed-{seed}")


def check_models(models) -> tuple[str, ...]:
    """`models` as a tuple of distinct known model names.

    Raises:
        ValueError: Empty, unknown or repeated names.
    """
    models = tuple(models)
    known = tuple(MODELS)
    if not models:
        raise ValueError(f"--models needs at least one of: {', '.join(known)}.")
    unknown = [m for m in models if m not in known]
    if unknown:
        raise ValueError(
            f"Unknown --models {', '.join(map(repr, unknown))}. Choose from: {', '.join(known)}."
        )
    if len(set(models)) != len(models):
        raise ValueError(f"--models must be distinct. Received: {', '.join(models)}.")
    return models


def check_seeds(seeds) -> tuple[int, ...]:
    """`seeds` as a tuple of distinct integers >= 0.

    Raises:
        ValueError: Empty, not integers, negative or repeated.
    """
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError("--seeds needs at least one seed, e.g. --seeds 0,1,2.")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Seeds must be integers >= 0. Received: {seed!r}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"Seeds must be distinct. Received: {list(seeds)}.")
    return seeds


def compare(
    base: RunConfig,
    models: tuple[str, ...] = DEFAULT_MODELS,
    out: str | None = None,
    seeds: tuple[int, ...] | None = None,
) -> dict:
    """Trains each of `models` with `base`'s settings (same seed, data, budget).

    Writes `<out>/<model>/` (every output of `train`) and the report of
    `report`. With `seeds`, each model trains once per seed (the seed of the
    weights and of the batches) in `<out>/<model>/seed-<s>/` and the report
    is `report_seeds`'. Rerunning resumes unfinished runs (see `train`).

    With `--tokenizer sentencepiece` and no `spm_model`, one vocabulary is
    trained here (`<out>/tokenizer.model`) and every model and seed uses it,
    so the losses are in the same units.

    Returns:
        What `report` (or `report_seeds`) returns.
    """
    models = check_models(models)
    base.validate()
    out = os.path.abspath(out or base.out)
    os.makedirs(out, exist_ok=True)
    base = shared_tokenizer(base, out)
    if seeds is None:
        summaries = {}
        for model in models:
            config = dataclasses.replace(base, model=model, out=run_dir(out, model))
            summaries[model] = train(config)
        return report(summaries, out)
    by_seed = {}
    # Seed-major order: an interrupted comparison has whole seeds to report.
    for seed in check_seeds(seeds):
        by_seed[seed] = {}
        for model in models:
            config = dataclasses.replace(
                base, model=model, seed=seed, out=run_dir(out, model, seed)
            )
            by_seed[seed][model] = train(config)
    return report_seeds(by_seed, out)


def shared_tokenizer(base: RunConfig, out: str) -> RunConfig:
    """`base` with `spm_model` set to one SentencePiece model for every run.

    Bytes, or a given `spm_model`, leave `base` as it is. Otherwise
    `<out>/tokenizer.model` is trained on the corpus (seed `base.seed`) or,
    on a rerun, reused.

    Raises:
        ValueError: `<out>/tokenizer.model` has another vocabulary size than
            `base.vocabulary_size` (it belongs to another comparison).
    """
    if base.tokenizer != "sentencepiece" or base.spm_model:
        return base
    path = os.path.join(out, "tokenizer.model")
    if os.path.exists(path):
        size = SentencePieceCodec(path).vocabulary_size
        if size != base.vocabulary_size:
            raise ValueError(
                f"{path} has {size} pieces, not --vocab-size {base.vocabulary_size}: it "
                "belongs to another comparison. Pass another --out, or --spm-model to reuse it."
            )
    else:
        data = base.data or shakespeare_path(None, download=base.download)
        files = list_text_files(os.path.abspath(os.path.expanduser(data)))
        train_sentencepiece(files, base.vocabulary_size, path, seed=base.seed)
    return dataclasses.replace(base, spm_model=path)


def load_summaries(out: str, models: tuple[str, ...], seeds: tuple[int, ...] | None = None) -> dict:
    """The `summary.json` of each finished run under `out` (for `report`);
    with `seeds`, `{seed: {model: summary}}` (for `report_seeds`).

    Raises:
        ValueError: A model's run has no summary (it did not finish).
    """
    if seeds is not None:
        return {seed: _load(out, models, seed) for seed in check_seeds(seeds)}
    return _load(out, models, None)


def _load(out: str, models: tuple[str, ...], seed: int | None) -> dict:
    summaries = {}
    for model in models:
        path = os.path.join(run_dir(out, model, seed), "summary.json")
        if not os.path.exists(path):
            which = model if seed is None else f"{model} seed {seed}"
            raise ValueError(f"No finished `{which}` run in {out}: {path} is missing.")
        with open(path) as f:
            summaries[model] = json.load(f)
    return summaries
