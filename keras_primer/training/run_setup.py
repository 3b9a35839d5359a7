"""Opening a run (stage 1 of `driver.train`): what its stages share, decided
before anything is written.

`open_run` checks the config and this process (backend, precision,
packages), decides the tokenizer (`choose_tokenizer`, the one place that
does), the preset, the optional outputs and the run's folder, and returns
the `Run` that the later stages read and fill in: the corpus (`run_data`),
the codec, splits and validation windows, the step the run goes on from, its
history rows and clock (`run_model`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field

import keras

from keras_primer.data import TokenSplits, content_fingerprint, train_sentencepiece
from keras_primer.training.callbacks import Clock
from keras_primer.training.distribution import initialize_multi_host, worker_position
from keras_primer.training.run_dir import CheckpointStore
from keras_primer_cli.errors import ConfigError, printable
from keras_primer_cli.presets import TrainPreset
from keras_primer_cli.run_config import RunConfig
from keras_primer_runtime.generation import ByteCodec, SentencePieceCodec


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
    say = say or note
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


def note(message: str) -> None:
    """Says `message` on stderr, as a note of `keras-primer train`."""
    print(f"keras-primer train: note: {printable(message)}", file=sys.stderr)
