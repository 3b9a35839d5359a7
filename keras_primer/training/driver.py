"""The training driver: `train(config)` as a pipeline of named stages.

Each stage is a function with one job that can be called (and tested) alone.
The stages share one small `Run` (the run's settings, folder and what the
earlier stages found) instead of long argument lists:

1. `open_run`           check the config and this process (backend,
                        precision, packages, memory); decide the tokenizer
                        (`choose_tokenizer`, the one place that does) and
                        the run's folder; nothing is written yet
2. `claim_folder`       `--out` is new, empty or a run folder (its
                        `run.json`); refuse anything else before any work;
                        clean what a killed run left
3. `locate_corpus`      the corpus files and their content hashes
4. `run_definition`     everything that defines the run (compared on resume)
5. `reconcile_run`      accept a fresh run, a resume, an extension or a
                        `--fine-tune`; refuse any other change (with a diff)
6. `prepare_data`       the codec, the (verified) token cache, splits and
                        validation windows
7. `build_model`        the compiled causal LM
8. `restore_checkpoint` the last committed step, its history and clock
9. `make_callbacks`     checkpoint commits, history, `best.keras`, the log
10. `fit_segments`      `fit()` from that step to the last
11. `write_reports`     model.keras, samples, learning curve, summary.json

The run folder holds one writer (`RunLock`); checkpoints, `model.keras`,
`best.keras`, `history.csv` and `run.json` are all written atomically.
`run.json` records a change (an extension, a `--fine-tune`) only once the
checkpoint it continues has been restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass, field

import keras
import numpy as np

from keras_primer.data import (
    TokenSplits,
    WindowDataset,
    content_fingerprint,
    list_text_files,
    load_splits,
    shakespeare_path,
    train_sentencepiece,
    validation_arrays,
)
from keras_primer.models.base import PERPLEXITY_LOSS_CAP
from keras_primer.models.registry import build_causal_lm
from keras_primer.training.callbacks import (
    Clock,
    RunRecorder,
    TrainingLog,
    optimizer_step,
    read_state,
    step_seeder,
    sync_state,
    write_state,
)
from keras_primer.training.distribution import (
    distribution_scope,
    initialize_multi_host,
    worker_position,
)
from keras_primer.training.optimizer import build_optimizer
from keras_primer.training.reporting import (
    generate_text,
    plot_learning_curve,
    write_json,
)
from keras_primer.training.run_dir import (
    CheckpointStore,
    RunLock,
    atomic_write,
    commit_file,
    remove_temp_files,
    temp_path,
    write_history_csv,
    write_json_atomic,
)
from keras_primer_cli.errors import ConfigError, printable
from keras_primer_cli.folder_lock import LOCK_FILE
from keras_primer_cli.interrupts import INTERRUPTS
from keras_primer_cli.ownership import ATOMIC_WRITE, RUN_RECORD, read_run_record
from keras_primer_cli.presets import TrainPreset
from keras_primer_cli.run_config import PRECISIONS, TOKENIZERS, RunConfig
from keras_primer_runtime.generation import ByteCodec, SentencePieceCodec

__all__ = ["RunConfig", "train", "plan_segments", "PRECISIONS", "TOKENIZERS"]

# Files of a run folder written through a temporary sibling (`atomic_write`):
# a temporary file is ours to remove only if it stands for one of these.
ATOMIC_OUTPUTS = (
    RUN_RECORD,
    "history.csv",
    "best.keras",
    "model.keras",
    "samples.txt",
    "summary.json",
)
# What a run writes into its folder (`--out`): a folder holding any other
# file is not refused only if it is a run folder (it has our `run.json`).
RUN_OUTPUTS = ATOMIC_OUTPUTS + (
    "checkpoints",
    "data",
    "tokenizer.model",
    "learning_curve.png",
    "tensorboard",
)
# The folder of process i > 0 of a multi-host run, inside process 0's `--out`.
WORKER_FOLDER = re.compile(r"worker-[1-9]\d*")
# Folders a run writes into: each must be a folder (or not exist yet).
RUN_FOLDERS = ("checkpoints", "data", "tensorboard")


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------- the run


@dataclass
class Corpus:
    """The corpus of a run: its path, files and `[name, bytes, sha256]` per file."""

    path: str
    files: list
    fingerprint: list


@dataclass
class TokenizerChoice:
    """The run's tokenizer, decided once by `choose_tokenizer`.

    Attributes:
        kind: `"bytes"` or `"sentencepiece"`.
        spm_model: The given SentencePiece model file (absolute), or None.
        spm_sha256: Its content hash (part of the run's definition).
        vocabulary_size: Pieces of a SentencePiece model trained by the run.
    """

    kind: str
    spm_model: str | None = None
    spm_sha256: str | None = None
    vocabulary_size: int | None = None

    def definition(self) -> dict:
        """What of the tokenizer defines the run (compared on resume)."""
        if self.kind != "sentencepiece":
            return {"kind": self.kind}
        if self.spm_model:
            return {"kind": self.kind, "model_sha256": self.spm_sha256}
        return {"kind": self.kind, "vocabulary_size": self.vocabulary_size}

    def make_codec(self, corpus: Corpus, out: str, seed: int = 0):
        """Bytes, the given model, the run's saved `tokenizer.model`, or a new
        model trained on the corpus (saved as `out/tokenizer.model`)."""
        if self.kind == "bytes":
            return ByteCodec()
        if self.spm_model:
            return SentencePieceCodec(self.spm_model)
        saved = os.path.join(out, "tokenizer.model")
        if os.path.exists(saved):
            codec = SentencePieceCodec(saved)
            if codec.vocabulary_size == self.vocabulary_size:
                return codec
        return train_sentencepiece(corpus.files, self.vocabulary_size, saved, seed=seed)


@dataclass
class Run:
    """What the stages of one `train()` call share, filled in stage by stage.

    `open_run` sets the settings and the folder; `locate_corpus` the corpus;
    `prepare_data` the codec, splits and validation windows;
    `restore_checkpoint` the start step, history rows and clock.
    """

    config: RunConfig
    preset: TrainPreset
    tokenizer: TokenizerChoice
    out: str
    outputs: dict
    corpus: Corpus | None = None
    codec: object = None
    splits: TokenSplits | None = None
    val: tuple | None = None
    start: int = 0
    rows: list = field(default_factory=list)
    clock: Clock = field(default_factory=Clock)

    @property
    def total_steps(self) -> int:
        return self.preset.steps

    @property
    def eval_interval(self) -> int:
        return max(1, min(self.preset.eval_interval, self.total_steps))

    @property
    def checkpoint_interval(self) -> int:
        return max(1, self.preset.checkpoint_interval)

    @property
    def store(self) -> CheckpointStore:
        return CheckpointStore(self.path("checkpoints"))

    def path(self, name: str) -> str:
        """The path of `name` in the run's folder."""
        return os.path.join(self.out, name)


# ----------------------------------------------------------------- stages


def open_run(config: RunConfig, say=None) -> Run:
    """Checks `config` and this process; decides the preset, the tokenizer and
    the folder (joining a multi-host run first). Writes nothing (except, once,
    a note of skipped outputs)."""
    config.validate()
    check_runtime(config)
    tokenizer = choose_tokenizer(config)
    preset = resolve_preset(config)
    if config.multi_host:
        initialize_multi_host()  # before any JAX call, `run_folder`'s included
    out = run_folder(config)
    return Run(
        config=config,
        preset=preset,
        tokenizer=tokenizer,
        out=out,
        outputs=optional_outputs(config, out, say),
    )


def check_runtime(config: RunConfig) -> None:
    """Checks that this process can run `config` (call after `config.validate()`).

    Raises:
        ConfigError: Keras runs another backend than `config.backend`, or
            `mixed_float16` on JAX's CPU backend (no float16 matmul with
            float32 accumulation in XLA's CPU backend).
    """
    running = keras.backend.backend()
    if config.backend and config.backend != running:
        raise ConfigError(
            f"This process runs Keras on {running!r}, not {config.backend!r}: the backend "
            f"is fixed when Keras is imported. Set KERAS_BACKEND={config.backend} before "
            "importing Keras, or run `keras-primer train --backend ...` in a fresh process."
        )
    if config.precision == "mixed_float16" and running == "jax":
        import jax

        if jax.default_backend() == "cpu":
            raise ConfigError(
                "mixed_float16 does not run on JAX's CPU backend: XLA's CPU matmul has no "
                "float16 inputs with float32 accumulation. Use mixed_bfloat16 on a CPU, or "
                "mixed_float16 on a GPU."
            )


def choose_tokenizer(config: RunConfig) -> TokenizerChoice:
    """The run's tokenizer: the one place that decides it.

    Raises:
        ConfigError: SentencePiece is asked for but a package it needs is
            missing, or `--spm-model` is not a SentencePiece model file.
    """
    if config.tokenizer != "sentencepiece":
        return TokenizerChoice(kind=config.tokenizer)
    for package, pip in (
        ("sentencepiece", "sentencepiece"),
        ("tensorflow_text", "tensorflow-text"),
    ):
        if not _installed(package):
            raise ConfigError(
                f"--tokenizer sentencepiece needs the `{package}` package, which is not "
                f"installed: `pip install {pip}`, or use --tokenizer bytes."
            )
    if not config.spm_model:
        return TokenizerChoice(kind="sentencepiece", vocabulary_size=config.vocabulary_size)
    path = os.path.abspath(os.path.expanduser(config.spm_model))
    try:
        SentencePieceCodec(path)
    except (RuntimeError, ValueError, OSError) as error:
        # SentencePiece's own message is about protobuf internals, not the file.
        detail = " ".join(str(error).split())[:200]
        raise ConfigError(
            f"--spm-model {path} is not a usable SentencePiece model ({detail}). Pass a "
            "`.model` file written by SentencePiece (`train_sentencepiece`), or leave "
            "--spm-model out to train one on the corpus."
        ) from None
    sha = content_fingerprint([path])[0][2]
    return TokenizerChoice(kind="sentencepiece", spm_model=path, spm_sha256=sha)


def resolve_preset(config: RunConfig) -> TrainPreset:
    """The run's `TrainPreset`: `config.preset` with the config's overrides."""
    return config.resolved_preset()


def optional_outputs(config: RunConfig, out: str, say=None) -> dict:
    """Which optional outputs this install can write into `out`; says once what it skips.

    Returns `{"learning_curve": bool, "tensorboard": bool}`.
    """
    say = say or _note
    have_plot = _installed("matplotlib")
    have_tb = config.tensorboard and _installed("tensorboard")
    skipped, fix = [], ""
    if not have_plot:
        skipped.append("learning_curve.png (matplotlib is not installed)")
        fix = " `pip install keras-primer[train]` adds them."
    if config.tensorboard and not have_tb:
        skipped.append("TensorBoard logs (tensorboard is not installed)")
        fix = " `pip install keras-primer[train]` adds them."
    elif have_tb and not _is_utf8(out):
        # TensorFlow's summary writer takes its folder as UTF-8 text only.
        have_tb = False
        skipped.append("TensorBoard logs (TensorFlow writes only to UTF-8 paths)")
    if skipped:
        say(
            "this run will skip "
            + " and ".join(skipped)
            + "; history.csv has the same numbers."
            + fix
        )
    return {"learning_curve": have_plot, "tensorboard": have_tb}


def _is_utf8(path: str) -> bool:
    """Whether `path` (bytes on Linux, undecodable ones as surrogate escapes) is UTF-8 text."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def run_folder(config: RunConfig) -> str:
    """The absolute folder this process writes: `config.out`, or
    `config.out/worker-<i>` for process `i > 0` of a multi-host run."""
    out = os.path.abspath(os.path.expanduser(config.out))
    worker, _ = worker_position(config.distribution)
    return os.path.join(out, f"worker-{worker}") if worker else out


def check_folder_owned(out: str) -> None:
    """Refuses an `--out` that is not new, empty or a run folder (our `run.json`).

    Call before anything is written to `out`. What a killed start of a run
    leaves before its `run.json` (the lock, the temporary file of `run.json`,
    the `worker-<i>` folders of the other processes of a multi-host run, each
    one new, empty or a run folder itself) does not count; anything else does,
    whatever its name.

    Raises:
        ConfigError: `out` holds other files (the message names those a run
            would overwrite), or a `run.json` that is not a run record.
    """
    if not os.path.isdir(out):
        return
    record = os.path.join(out, RUN_RECORD)
    if os.path.lexists(record):
        read_run_record(record)  # a run folder only with our run.json
        return
    foreign = sorted(name for name in os.listdir(out) if not _left_by_a_start(out, name))
    if not foreign:
        return
    clashes = [name for name in foreign if name in RUN_OUTPUTS]
    what = (
        f"a run would overwrite {', '.join(clashes)}"
        if clashes
        else f"it holds {len(foreign)} other file(s) ({', '.join(foreign[:5])})"
    )
    raise ConfigError(
        f"--out {out} is not a keras-primer run folder (no run.json) and is not empty: "
        f"{what}. Pass a new or empty folder as --out."
    )


def _left_by_a_start(out: str, name: str) -> bool:
    """Whether `out/name` is what a killed start of a run leaves before its `run.json`."""
    path = os.path.join(out, name)
    if name == LOCK_FILE or ATOMIC_WRITE.matches(name, target=(RUN_RECORD,)):
        return os.path.isfile(path) and not os.path.islink(path)
    if WORKER_FOLDER.fullmatch(name) and os.path.isdir(path) and not os.path.islink(path):
        try:
            check_folder_owned(path)
        except ConfigError:
            return False
        return True
    return False


def claim_folder(run: Run) -> None:
    """Checks, under the run's lock, that every folder the run writes into is
    a folder, and removes temporary files that a killed run left."""
    refuse_old_layout(run.out)
    for name in RUN_FOLDERS:
        path = run.path(name)
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(
                f"{path} is a file, but the run keeps its {name} in a folder of that name. "
                "Move the file away, or pass another --out."
            )
    run.store.remove_leftovers()
    # Our atomic writes that a kill interrupted; this process holds the lock.
    remove_temp_files(run.out, ATOMIC_OUTPUTS)


def refuse_old_layout(out: str) -> None:
    """Refuses a folder written by keras-primer before checkpoints/ existed."""
    if os.path.isdir(os.path.join(out, "backup")) and not os.path.isdir(
        os.path.join(out, "checkpoints")
    ):
        raise ConfigError(
            f"{out} was written by an older keras-primer (a backup/ folder, no checkpoints/), "
            "which this version cannot resume safely. Pass another --out."
        )


def locate_corpus(config: RunConfig) -> Corpus:
    """The corpus files and their content hashes (Tiny Shakespeare by default).

    Raises:
        DataFileError: A file is missing, empty or not UTF-8 text.
    """
    data = config.data if config.data else shakespeare_path(None, download=config.download)
    path = os.path.abspath(os.path.expanduser(data))
    files = list_text_files(path, say=_note)
    root = path if os.path.isdir(path) else os.path.dirname(path)
    fingerprint = [
        [os.path.relpath(f, root), size, sha]
        for f, size, sha in content_fingerprint(files, text=True)
    ]
    return Corpus(path, files, fingerprint)


def run_definition(
    config: RunConfig,
    preset: TrainPreset,
    corpus: Corpus,
    tokenizer: TokenizerChoice | None = None,
) -> dict:
    """Everything that makes two runs the same run (`--steps` aside).

    Compared on resume: data (content hashes, not names or dates), tokenizer,
    model, architecture, seed, batch size, schedule, evaluation and precision.
    """
    tokenizer = tokenizer or choose_tokenizer(config)
    p = preset
    return {
        "model": config.model,
        "architecture": {
            "num_layers": p.num_layers,
            "num_heads": p.num_heads,
            "hidden_dim": p.hidden_dim,
            "intermediate_dim": p.intermediate_dim,
            "sequence_length": p.sequence_length,
        },
        "tokenizer": tokenizer.definition(),
        "data": {
            "files": [[name, sha] for name, _, sha in corpus.fingerprint],
            "val_fraction": config.val_fraction,
        },
        "seed": config.seed,
        "batch_size": p.batch_size,
        "dropout": p.dropout,
        "schedule": {
            "learning_rate": p.learning_rate,
            "min_learning_rate": p.min_learning_rate,
            "warmup_steps": p.warmup_steps,
            "weight_decay": p.weight_decay,
            "beta_1": p.beta_1,
            "beta_2": p.beta_2,
            "clipnorm": p.clipnorm,
        },
        "evaluation": {"eval_interval": p.eval_interval, "eval_windows": p.eval_windows},
        "precision": config.precision,
    }


# Changes no flag can carry over: the saved weights would not fit.
_STRUCTURAL = ("model", "architecture", "tokenizer")


def definition_diff(old: dict, new: dict) -> list[str]:
    """`"key: old -> new"` for every setting that differs (nested keys dotted)."""

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    def show(v):
        if isinstance(v, list) and v and isinstance(v[0], list):  # data files
            return "[" + ", ".join(f"{name} sha256:{sha[:12]}" for name, sha in v) + "]"
        return repr(v)

    a, b = dict(flat(old)), dict(flat(new))
    return [
        f"{k}: {show(a.get(k))} -> {show(b.get(k))}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def reconcile_run(
    out: str,
    definition: dict,
    total_steps: int,
    committed_step: int | None,
    fine_tune: bool = False,
    say=None,
    write: bool = True,
) -> dict:
    """Decides whether this run may write `out`; returns its `run.json` record.

    A folder without a checkpoint starts afresh. With one, the definition
    must match, except with `fine_tune` (recorded with its step), and only
    if the model, architecture and tokenizer are unchanged. A larger
    `total_steps` extends the run (said); one below the checkpoint is refused,
    and so is a `fine_tune` that would train no step.

    Args:
        write: Write the record to `run.json` (atomically). `train` writes a
            changed record itself, once the checkpoint is restored.

    Raises:
        ConfigError: The change is refused (the message has the diff and
            the ways forward), or `run.json` is not a run record.
    """
    say = say or _note
    path = os.path.join(out, RUN_RECORD)
    saved = read_run_record(path) if os.path.exists(path) else None
    if saved is None or committed_step is None:
        if committed_step is not None:
            raise ConfigError(
                f"{out} holds checkpoints but no run.json, so what they continue is unknown. "
                "Pass another --out, or move the checkpoints/ folder away to start afresh."
            )
        record = {"definition": definition, "steps": total_steps, "changes": []}
        if write:
            write_json_atomic(path, record)
        return record
    record = dict(saved)
    changes = definition_diff(saved["definition"], definition)
    if changes:
        structural = [c for c in changes if c.split(".")[0].split(":")[0] in _STRUCTURAL]
        if structural or not fine_tune:
            way = (
                "The model, architecture and tokenizer of saved weights cannot change: pass "
                "another --out for a new run."
                if structural
                else "Pass another --out for a new run, or --fine-tune to continue these weights "
                "under the new settings on purpose (recorded in run.json)."
            )
            raise ConfigError(
                f"{out} holds a different run (checkpoint at step {committed_step}); changed: "
                + "; ".join(changes)
                + ". "
                + way
            )
        if committed_step >= total_steps:
            raise ConfigError(
                f"--fine-tune continues the weights of step {committed_step} of {out}, but "
                f"--steps {total_steps} leaves no step to train under the new settings. Pass "
                f"--steps larger than {committed_step} (the run's total, not the steps to add)."
            )
        say(f"fine-tuning from step {committed_step} with changed settings: " + "; ".join(changes))
        record["changes"] = list(record.get("changes", [])) + [
            {"step": committed_step, "kind": "fine_tune", "changed": changes}
        ]
        record["definition"] = definition
    if committed_step > total_steps:
        raise ConfigError(
            f"{out} holds a checkpoint at step {committed_step}, past --steps {total_steps}. "
            f"Pass --steps {committed_step} or more to continue it, or another --out."
        )
    if total_steps != saved.get("steps"):
        say(
            f"extending the run from {saved.get('steps')} to {total_steps} steps; the "
            f"learning-rate schedule now decays over {total_steps} steps."
        )
        record["changes"] = list(record.get("changes", [])) + [
            {
                "step": committed_step,
                "kind": "steps",
                "changed": [f"steps: {saved.get('steps')} -> {total_steps}"],
            }
        ]
        record["steps"] = total_steps
    if write and record != saved:
        write_json_atomic(path, record)
    return record


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
        say=_note,
    )
    run.val = validation_arrays(
        run.splits.val, run.preset.sequence_length, run.preset.eval_windows, run.splits.start_id
    )


def build_model(run: Run):
    """The compiled causal LM with its optimizer built (variables exist)."""
    keras.utils.set_random_seed(run.config.seed)
    lm = build_causal_lm(run.config.model, run.preset, run.codec)
    lm.compile(
        optimizer=build_optimizer(run.preset, run.total_steps),
        # The one sampling default (greedy, `ContractSampler()`): model.keras,
        # samples.txt and the exports all generate the same text.
        jit_compile=run.config.jit_compile,
    )
    lm.optimizer.build(lm.trainable_variables)
    return lm


def restore_checkpoint(run: Run, lm) -> None:
    """Loads the newest checkpoint into `lm`; sets `run.start`, `run.rows` and
    the clock's offset (step 0, no rows, 0 s without one)."""
    store = run.store
    checkpoint = store.load_latest()
    if checkpoint is None:
        run.start, run.rows, run.clock.offset = 0, [], 0.0
        return
    step = checkpoint["step"]
    state = checkpoint["state"]
    write_state(lm, checkpoint["arrays"], store.path(step), written_on=state.get("backend"))
    if optimizer_step(lm) != step:
        raise ConfigError(
            f"Checkpoint {store.path(step)} is inconsistent: named step {step}, its optimizer "
            f"is at step {optimizer_step(lm)}. Move it away, or pass another --out."
        )
    run.start = step
    run.rows = list(state.get("history", []))
    run.clock.offset = float(state.get("wall_time", 0.0))


def plan_segments(start: int, total: int, interval: int) -> list[tuple[int, int, int, int]]:
    """`fit()` calls that take a run from step `start` to `total`.

    Epochs end at multiples of `interval` (evaluation points) and at `total`,
    so a resumed run evaluates at the same steps as an uninterrupted one.
    Returns `(first_step, initial_epoch, epochs, steps_per_epoch)` per call.

    >>> plan_segments(3, 12, 5)
    [(3, 0, 1, 2), (5, 1, 2, 5), (10, 2, 3, 2)]
    """
    segments = []
    step = start
    while step < total:
        epoch = step // interval
        boundary = (epoch + 1) * interval
        if step % interval or boundary > total:
            end = min(boundary, total)
            segments.append((step, epoch, epoch + 1, end - step))
            step = end
            continue
        full = (total - step) // interval
        segments.append((step, epoch, epoch + full, interval))
        step += full * interval
    return segments


def save_model_atomic(lm, path: str) -> None:
    """`lm.save(path)` through a temporary sibling renamed into place."""
    sync_state(lm)
    tmp = temp_path(path, suffix=".keras")
    try:
        lm.save(tmp)
        commit_file(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


@dataclass
class Callbacks:
    """The run's callbacks: `log` (throughput), `recorder` (checkpoints,
    history, `best.keras`, NaN stop) and `all` (what `fit()` gets)."""

    log: TrainingLog
    recorder: RunRecorder
    all: list


def make_callbacks(run: Run, lm, extra: list | None = None) -> Callbacks:
    """The callbacks of a run that starts at `run.start` (after `restore_checkpoint`)."""
    store = run.store
    history_path = run.path("history.csv")
    write_history_csv(history_path, run.rows)
    config = run.config

    def commit(step, history) -> bool:
        state = read_state(lm)
        if not all(np.isfinite(a).all() for a in state if a.dtype.kind == "f"):
            return False  # never commit weights that diverged
        store.commit(
            step,
            state,
            {
                "history": history,
                "wall_time": run.clock(),
                "data_position": {"seed": config.seed, "step": step},
                "backend": keras.backend.backend(),
            },
        )
        return True

    log = TrainingLog(
        run.preset.batch_size * run.preset.sequence_length,
        run.clock,
        run.splits.val_tokens_per_char,
    )
    recorder = RunRecorder(
        commit=commit,
        write_history=lambda history: write_history_csv(history_path, history),
        save_best=lambda: save_model_atomic(lm, run.path("best.keras")),
        rows=run.rows,
        start_step=run.start,
        total_steps=run.total_steps,
        checkpoint_interval=run.checkpoint_interval,
        eval_interval=run.eval_interval,
        reseed=step_seeder(config.seed),
    )
    # A Ctrl-C that a garbage-collector callback swallowed still stops the run.
    stop = keras.callbacks.LambdaCallback(on_train_batch_end=lambda *_, **__: INTERRUPTS.check())
    callbacks = [log, recorder, stop]
    if run.outputs["tensorboard"]:
        callbacks.append(keras.callbacks.TensorBoard(run.path("tensorboard"), write_graph=False))
    return Callbacks(log, recorder, callbacks + list(extra or []))


def fit_segments(run: Run, lm, dist, callbacks: Callbacks) -> None:
    """Runs `fit()` from `run.start` to the last step; the batches of step `s`
    are a function of `(seed, s)` alone, so a resumed run sees the same ones."""
    val_x, val_y = run.val
    preset = run.preset
    for first, initial_epoch, epochs, per_epoch in plan_segments(
        run.start, run.total_steps, run.eval_interval
    ):
        dataset = WindowDataset(
            run.splits.train,
            preset.sequence_length,
            preset.batch_size,
            num_steps=(epochs - initial_epoch) * per_epoch,
            start_step=first,
            seed=run.config.seed,
            start_id=run.splits.start_id,
            shard=dist.input_shard,
        )
        callbacks.recorder.step = first
        # The batches are token ids already: bypass keras-hub's string
        # preprocessing (`PipelineModel.fit`) and call Keras' own `fit`.
        keras.Model.fit(
            lm,
            dist.dataset(dataset),
            validation_data=(val_x, val_y),
            validation_batch_size=dist.eval_batch_size(preset.batch_size),
            initial_epoch=initial_epoch,
            epochs=epochs,
            steps_per_epoch=per_epoch,
            shuffle=False,  # batch i is the batch of step first + i
            callbacks=callbacks.all,
            verbose=run.config.verbose,
        )
        if callbacks.recorder.nan_step is not None:
            return


def check_finite(run: Run, callbacks: Callbacks) -> None:
    """Raises `TrainingDiverged` if the loss became NaN (the last good checkpoint stays)."""
    nan_step = callbacks.recorder.nan_step
    if nan_step is None:
        return
    last = run.store.steps()
    raise TrainingDiverged(
        f"The loss became NaN or infinite at step {nan_step}; stopped. "
        + (
            f"The last good checkpoint (step {last[-1]}) is kept in {run.store.folder}. "
            if last
            else "No checkpoint was written before it. "
        )
        + "Lower --learning-rate (with --fine-tune to continue the checkpoint), "
        "or check the data."
    )


def tokens_per_second(log: TrainingLog, history: list) -> float | None:
    """This call's measured throughput, else the last measured in the run's
    history (a rerun of a finished run trains nothing), else None."""
    if math.isfinite(log.tokens_per_second):
        return log.tokens_per_second
    measured = [
        r["tokens_per_second"]
        for r in history
        if isinstance(r.get("tokens_per_second"), (int, float))
        and math.isfinite(r["tokens_per_second"])
    ]
    return float(measured[-1]) if measured else None


def write_reports(run: Run, lm, dist, callbacks: Callbacks) -> dict:
    """Final evaluation, `model.keras`, samples, learning curve and `summary.json`."""
    config, preset, splits = run.config, run.preset, run.splits
    history = callbacks.recorder.rows
    val_x, val_y = run.val
    final_step = optimizer_step(lm)
    results = keras.Model.evaluate(
        lm,
        val_x,
        val_y,
        batch_size=dist.eval_batch_size(preset.batch_size),
        verbose=0,
        return_dict=True,
    )
    model_path = run.path("model.keras")
    save_model_atomic(lm, model_path)
    samples = {}
    if config.sample_tokens > 0 and dist.input_shard[1] > 1:
        # keras-hub's generate reads its outputs back on the host, which a
        # batch spread over several processes does not allow.
        print("No samples in a multi-host run: generate from model.keras on one host.")
    elif config.sample_tokens > 0:
        for prompt in config.prompts:
            samples[prompt] = generate_text(lm, prompt, config.sample_tokens)
        text = "".join(f"=== {p!r} ===\n{t}\n\n" for p, t in samples.items())
        with atomic_write(run.path("samples.txt"), "w") as f:
            f.write(text)
    preset_name = config.preset if isinstance(config.preset, str) else "custom"
    curve = None
    if run.outputs["learning_curve"]:
        curve = plot_learning_curve(
            history, run.path("learning_curve.png"), f"{config.model} ({preset_name})"
        )
    val_loss = float(results["loss"])
    losses = [r["val_loss"] for r in history if "val_loss" in r]
    summary = {
        "model": config.model,
        "preset": preset_name,
        "backend": keras.backend.backend(),
        "precision": config.precision,
        "distribution": config.distribution,
        "tokenizer": run.codec.describe(),
        "data": run.corpus.path,
        "parameters": int(lm.backbone.count_params()),
        "steps": final_step,
        "resumed_from_step": run.start,
        "batch_size": preset.batch_size,
        "sequence_length": preset.sequence_length,
        "train_tokens": int(len(splits.train)),
        "val_tokens": int(len(splits.val)),
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, PERPLEXITY_LOSS_CAP)),
        "val_bits_per_char": val_loss * splits.val_tokens_per_char / math.log(2.0),
        "best_val_loss": min(losses or [val_loss]),
        "tokens_per_second": tokens_per_second(callbacks.log, history),
        "wall_time_s": run.clock(),
        "history": history,
        "samples": samples,
        "files": {
            "model": model_path,
            "best_model": run.path("best.keras"),
            "history": run.path("history.csv"),
            "learning_curve": curve,
            "tensorboard": run.path("tensorboard") if run.outputs["tensorboard"] else None,
            "checkpoints": run.path("checkpoints"),
        },
        "preset_settings": dataclasses.asdict(preset),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "preset"},
    }
    write_json(run.path("summary.json"), summary)
    return summary


# ----------------------------------------------------------------- pipeline


def train(config: RunConfig, extra_callbacks: list | None = None) -> dict:
    """Trains `config.model` on the corpus and writes every output to `config.out`.

    Outputs: `checkpoints/step-<N>.npz` (atomic commits of the whole
    training state and history), `history.csv`, `best.keras` (lowest val
    loss), `model.keras` (last step), `learning_curve.png`, `samples.txt`,
    `summary.json`, `run.json` (the run's definition, checked on resume),
    `tensorboard/` and `data/tokens.bin` (the encoded corpus, verified on
    every reuse).

    `config.out` must be new, empty or a run folder (its `run.json`).
    Rerunning with the same settings continues from the last checkpoint;
    see `reconcile_run` for what may change.

    Args:
        config: The run's settings.
        extra_callbacks: More Keras callbacks.

    Returns:
        The summary dict written to `summary.json`.

    Raises:
        ConfigError, DataFileError, CheckpointError, RunLockedError,
        TrainingDiverged: (all `ValueError`) what went wrong and the fix.
    """
    run = open_run(config)
    check_folder_owned(run.out)
    with RunLock(run.out):
        claim_folder(run)
        run.corpus = locate_corpus(config)
        committed = run.store.steps()
        record = reconcile_run(
            run.out,
            run_definition(config, run.preset, run.corpus, run.tokenizer),
            run.total_steps,
            committed[-1] if committed else None,
            fine_tune=config.fine_tune,
            write=not committed,  # a fresh run claims the folder at once
        )
        prepare_data(run)
        with _dtype_policy(config.precision), distribution_scope(config.distribution) as dist:
            dist.check_batch_size(run.preset.batch_size)
            lm = build_model(run)
            restore_checkpoint(run, lm)
            write_json_atomic(run.path(RUN_RECORD), record)  # the change now happens
            if run.start and config.verbose:
                print(f"Resuming {printable(run.out)} from step {run.start} of {run.total_steps}.")
            callbacks = make_callbacks(run, lm, extra_callbacks)
            fit_segments(run, lm, dist, callbacks)
            check_finite(run, callbacks)
            return write_reports(run, lm, dist, callbacks)


def _note(message: str) -> None:
    print(f"keras-primer train: note: {printable(message)}", file=sys.stderr)


@contextlib.contextmanager
def _dtype_policy(name: str):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
