"""Every setting of a training run, declared once: `RunConfig` and the `train` parser.

Each `RunConfig` field carries its flag, help text, default and allowed
values; `build_train_parser()` builds `keras-primer train`'s argparse parser
from them and `config_from_args()` turns parsed flags back into a
`RunConfig`. `RunConfig.validate()` checks every value before any work
starts. Framework-free (standard library only): `keras-primer train --help`
and bad flags never import Keras, TensorFlow, JAX or PyTorch. The model
names come from the registry (`keras_primer_cli.model_registry`), the sizes
from `keras_primer_cli.presets`.

>>> config = config_from_args(build_train_parser().parse_args(["--out", "runs/x", "--steps", "5"]))
>>> config.steps, config.model
(5, 'primer_ez')
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from dataclasses import dataclass, field

from keras_primer_cli.errors import ConfigError
from keras_primer_cli.model_registry import MODELS, TRAINABLE_MODELS
from keras_primer_cli.presets import PRESETS, TrainPreset, get_preset
from keras_primer_runtime.generation import ByteCodec, check_prompt_tokens, check_prompts

TOKENIZERS = ("bytes", "sentencepiece")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
DISTRIBUTIONS = ("none", "data_parallel", "model_parallel", "mirrored")
JAX_DISTRIBUTIONS = ("data_parallel", "model_parallel")
BACKENDS = ("tensorflow", "jax", "torch")
DEFAULT_PROMPT = "ROMEO:"
# SentencePiece needs 4 special pieces, 256 byte fallbacks and some merges.
MIN_SENTENCEPIECE_VOCABULARY = 300
TRAIN_PROG = "keras-primer train"


def check_prompt(prompt, byte_tokenizer: bool = False) -> str:
    r"""Returns `prompt` if the decoding contract accepts it, else raises `ConfigError`.

    A command-line argument is the bytes it was given (undecodable bytes come
    as surrogate escapes), so the contract's Unicode rule judges those bytes.
    With the byte tokenizer, a character that is a special id (NUL, STX, ETX)
    is refused here too, before any training (SentencePiece never makes one).

    >>> check_prompt("ROMEO:")
    'ROMEO:'
    >>> check_prompt(os.fsdecode(b"x\xff"))
    Traceback (most recent call last):
    ...
    keras_primer_cli.errors.ConfigError: --prompt: Every prompt must be valid Unicode text: UTF-8 bytes, or a str without lone surrogates (U+D800 to U+DFFF); nothing is replaced silently. Received: b'x\xff' (invalid UTF-8 at byte 1). Pass --prompt TEXT, or --sample-tokens 0 for no samples.
    """
    given = prompt
    if isinstance(prompt, str):
        try:
            given = os.fsencode(prompt)  # the bytes of a command-line argument
        except UnicodeEncodeError:
            pass  # a lone surrogate no command line can give: the rule judges the str
    try:
        (checked,) = check_prompts([given])
        if byte_tokenizer:
            codec = ByteCodec()
            check_prompt_tokens(checked, codec.encode(checked), codec.spec.special_ids)
    except ValueError as error:
        message = str(error).rstrip(".")
        if "Received:" not in message:
            message += f". Received: {prompt!r}"
        raise ConfigError(
            f"--prompt: {message}. Pass --prompt TEXT, or --sample-tokens 0 for no samples."
        ) from None
    return checked


def _flag(default, help: str, flag: str | None = None, **argparse_kwargs):
    """A dataclass field that also describes its command-line flag.

    `flag=""` keeps the field out of the parser (library-only settings).
    """
    metadata = {"help": help, "flag": flag, "argparse": argparse_kwargs}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RunConfig:
    """Everything a training run needs; `None` fields take the preset's value.

    Every field is one `keras-primer train` flag (its name with dashes, unless
    the field says otherwise); see `build_train_parser()` or
    `keras-primer train --help` for each one's meaning.

    >>> RunConfig(out="runs/x", steps=0).validate()
    Traceback (most recent call last):
    ...
    keras_primer_cli.errors.ConfigError: --steps must be at least 1. Received: 0.
    """

    out: str = _flag(
        None,
        "output folder: checkpoints, models, reports; rerunning the "
        "same command resumes from its last checkpoint",
        required=True,
    )
    model: str = _flag(
        "primer_ez",
        "; ".join(f"{m.name}: {m.description}" for m in TRAINABLE_MODELS.values()),
        choices=tuple(TRAINABLE_MODELS),
    )
    data: str | None = _flag(
        None,
        "text file or folder of text files (default: Tiny "
        "Shakespeare from $KERAS_PRIMER_SHAKESPEARE, else downloaded)",
    )
    preset: str | TrainPreset = _flag(
        "tiny",
        "; ".join(f"{k}: {v.description}" for k, v in PRESETS.items()),
        choices=tuple(PRESETS),
    )
    steps: int | None = _flag(
        None, "total optimizer steps (a larger value extends a finished run)", type=int
    )
    batch_size: int | None = _flag(None, "windows per step", type=int)
    sequence_length: int | None = _flag(None, "tokens per window (the context)", type=int)
    learning_rate: float | None = _flag(None, "peak learning rate", type=float)
    dropout: float | None = _flag(None, "dropout rate in [0, 1)", type=float)
    eval_interval: int | None = _flag(None, "steps between evaluations", type=int)
    checkpoint_interval: int | None = _flag(
        None, "steps between checkpoints (the last step is always one)", type=int
    )
    tokenizer: str = _flag(
        "bytes", "bytes, or a SentencePiece model trained on the corpus", choices=TOKENIZERS
    )
    vocabulary_size: int = _flag(
        1024, "SentencePiece vocabulary size", flag="--vocab-size", type=int
    )
    spm_model: str | None = _flag(None, "existing SentencePiece .model to use")
    val_fraction: float = _flag(
        0.1, "share of the corpus (its end) held out, in (0, 0.5]", type=float
    )
    seed: int = _flag(0, "seed of the weights and of the batches", type=int)
    precision: str = _flag("float32", "dtype policy", choices=PRECISIONS)
    jit_compile: str | bool = _flag("auto", "XLA/compiled steps", choices=("auto", "true", "false"))
    distribution: str = _flag(
        "none",
        "JAX: data_parallel, model_parallel (with --multi-host: several hosts); "
        "TensorFlow: mirrored (one host)",
        choices=DISTRIBUTIONS,
    )
    multi_host: bool = _flag(
        False,
        "JAX: keras.distribution.initialize() first; the cluster "
        "comes from KERAS_DISTRIBUTION_JOB_ADDRESSES, _NUM_PROCESSES and "
        "_PROCESS_ID",
        action="store_true",
    )
    backend: str | None = _flag(None, "Keras backend (default: $KERAS_BACKEND)", choices=BACKENDS)
    prompts: list[str] = _flag(
        [DEFAULT_PROMPT],
        f"sample prompt, repeatable (default: {DEFAULT_PROMPT!r})",
        flag="--prompt",
        action="append",
    )
    sample_tokens: int = _flag(200, "tokens generated per prompt at the end (0: none)", type=int)
    fine_tune: bool = _flag(
        False,
        "continue the weights in --out although the run definition changed (other "
        "data, seed, batch size, schedule); the change and its step go into run.json. "
        "The model and the tokenizer must stay the same",
        action="store_true",
    )
    download: bool = _flag(
        True, "never download Tiny Shakespeare", flag="--no-download", action="store_false"
    )
    tensorboard: bool = _flag(
        True, "no TensorBoard logs", flag="--no-tensorboard", action="store_false"
    )
    verbose: int = _flag(
        1, "Keras progress: bar (1), one line per epoch (2), none (0)", type=int, choices=(0, 1, 2)
    )
    debug: bool = _flag(False, "show the traceback of an error", action="store_true")

    def validate(self) -> RunConfig:
        """Checks every setting (no framework needed); returns `self`.

        Raises:
            ConfigError: The first wrong setting, with what is expected.
        """
        for name, value, allowed in (
            ("model", self.model, tuple(MODELS)),
            ("tokenizer", self.tokenizer, TOKENIZERS),
            ("precision", self.precision, PRECISIONS),
            ("distribution", self.distribution, DISTRIBUTIONS),
            ("jit_compile", self.jit_compile, ("auto", True, False)),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"Unknown {_flag_name(name)} {value!r}. Choose one of: "
                    f"{', '.join(str(a) for a in allowed)}."
                )
        if self.backend is not None and self.backend not in BACKENDS:
            raise ConfigError(
                f"Unknown --backend {self.backend!r}. Choose one of: {', '.join(BACKENDS)}."
            )
        if not self.out or not isinstance(self.out, str):
            raise ConfigError("--out is required: the folder of the run's outputs.")
        if os.path.exists(self.out) and not os.path.isdir(self.out):
            raise ConfigError(f"--out {self.out} is a file; pass a folder (new or of this run).")
        preset = get_preset(self.preset)
        for name in (
            "steps",
            "batch_size",
            "sequence_length",
            "eval_interval",
            "checkpoint_interval",
        ):
            value = getattr(self, name)
            minimum = 2 if name == "sequence_length" else 1
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < minimum
            ):
                raise ConfigError(
                    f"{_flag_name(name)} must be at least {minimum}. Received: {value}."
                )
        _check_real("learning_rate", self.learning_rate, low=0.0, low_open=True)
        _check_real("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        _check_real("val_fraction", self.val_fraction, low=0.0, high=0.5, low_open=True)
        if self.sample_tokens < 0:
            raise ConfigError(f"--sample-tokens must be 0 or more. Received: {self.sample_tokens}.")
        if self.sample_tokens:
            if not self.prompts:
                raise ConfigError("No sample prompts: pass --prompt TEXT or --sample-tokens 0.")
            for prompt in self.prompts:
                check_prompt(prompt, byte_tokenizer=self.tokenizer == "bytes")
        if self.tokenizer == "sentencepiece" and not self.spm_model:
            if self.vocabulary_size < MIN_SENTENCEPIECE_VOCABULARY:
                raise ConfigError(
                    f"--vocab-size must be at least {MIN_SENTENCEPIECE_VOCABULARY} (4 special "
                    f"pieces, 256 byte fallbacks and some merges). Received: {self.vocabulary_size}."
                )
        if self.spm_model and self.tokenizer != "sentencepiece":
            raise ConfigError("--spm-model needs --tokenizer sentencepiece.")
        for name in ("data", "spm_model"):
            path = getattr(self, name)
            if path and not os.path.exists(os.path.expanduser(path)):
                raise ConfigError(
                    f"{_flag_name(name)} {path} does not exist. Pass an existing path."
                )
        if self.multi_host and self.distribution not in JAX_DISTRIBUTIONS:
            raise ConfigError(
                "--multi-host (keras.distribution.initialize) needs --distribution "
                f"data_parallel or model_parallel on JAX; this run has `{self.distribution}`."
            )
        if self.multi_host and self.jit_compile is False:
            raise ConfigError(
                "--multi-host needs compiled steps: without them every operation would be "
                "a separate exchange between the hosts. Leave --jit-compile at auto or true."
            )
        backend = self.backend or os.environ.get("KERAS_BACKEND")
        if backend in BACKENDS:
            _check_distribution_backend(self.distribution, backend)
        batch = self.batch_size or preset.batch_size
        if batch < 1:
            raise ConfigError(f"--batch-size must be at least 1. Received: {batch}.")
        check_fits_memory(self.resolved_preset(), self.precision)
        return self

    def resolved_preset(self) -> TrainPreset:
        """The run's `TrainPreset`: `preset` with this config's overrides."""
        return get_preset(
            self.preset,
            steps=self.steps,
            batch_size=self.batch_size,
            sequence_length=self.sequence_length,
            learning_rate=self.learning_rate,
            dropout=self.dropout,
            eval_interval=self.eval_interval,
            checkpoint_interval=self.checkpoint_interval,
        )


def attention_score_bytes(preset: TrainPreset, precision: str = "float32") -> int:
    """A lower bound of one training step's memory: the causal attention scores
    of every layer, which the backward pass keeps (`L (L + 1) / 2` per head).

    >>> attention_score_bytes(PRESETS["tiny"].replace(sequence_length=100_000, batch_size=1))
    80000800000
    """
    itemsize = 4 if precision == "float32" else 2
    pairs = preset.sequence_length * (preset.sequence_length + 1) // 2
    return preset.num_layers * preset.batch_size * preset.num_heads * pairs * itemsize


def physical_memory_bytes() -> int | None:
    """This machine's memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits_memory(preset: TrainPreset, precision: str = "float32") -> None:
    """Refuses a run whose attention scores alone exceed this machine's memory,
    before anything is built (rather than an out-of-memory error mid-run).

    Raises:
        ConfigError: With the numbers, the limit and the flags to change.
    """
    need, have = attention_score_bytes(preset, precision), physical_memory_bytes()
    if have is None or need <= have:
        return
    p = preset
    gib = 2**30
    raise ConfigError(
        f"--sequence-length {p.sequence_length} with --batch-size {p.batch_size} needs at least "
        f"{need / gib:,.0f} GiB for one step's attention scores ({p.num_layers} layers x "
        f"{p.batch_size} windows x {p.num_heads} heads x {p.sequence_length}^2/2 x "
        f"{4 if precision == 'float32' else 2} bytes), more than this machine's "
        f"{have / gib:,.0f} GiB. Use a shorter --sequence-length or a smaller --batch-size."
    )


def _flag_name(name: str) -> str:
    for f in dataclasses.fields(RunConfig):
        if f.name == name:
            return f.metadata.get("flag") or "--" + name.replace("_", "-")
    return name


def _check_real(name, value, low=None, high=None, low_open=False, high_open=False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{_flag_name(name)} must be a finite number. Received: {value!r}.")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        interval = f"{'(' if low_open else '['}{low}, {high if high is not None else 'inf'}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{_flag_name(name)} must be in {interval}. Received: {value!r}.")


def _check_distribution_backend(kind: str, backend: str) -> None:
    if kind in JAX_DISTRIBUTIONS and backend != "jax":
        raise ConfigError(
            f"--distribution {kind} (keras.distribution) needs the JAX backend; this run "
            f"uses {backend}. "
            + (
                "Use `mirrored` on TensorFlow."
                if backend == "tensorflow"
                else "Keras has no multi-device training on PyTorch."
            )
        )
    if kind == "mirrored" and backend != "tensorflow":
        raise ConfigError(
            f"--distribution mirrored (tf.distribute) needs the TensorFlow backend; this run "
            f"uses {backend}. On JAX use data_parallel or model_parallel."
        )


def build_train_parser(prog: str = "keras-primer train") -> argparse.ArgumentParser:
    """The argument parser of `keras-primer train`, built from `RunConfig`'s fields.

    >>> build_train_parser().parse_args(["--out", "o", "--vocab-size", "400"]).vocabulary_size
    400
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train Primer EZ, the Transformer baseline or the Feedback Transformer "
        "on Tiny Shakespeare or any text file/folder. Rerun the same command to resume.",
    )
    for f in dataclasses.fields(RunConfig):
        meta = f.metadata
        kwargs = dict(meta["argparse"])
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        kwargs.setdefault("dest", f.name)
        action = kwargs.get("action")
        if action == "append":
            kwargs["default"] = None  # argparse appends to a given default list
        elif action not in ("store_true", "store_false"):
            kwargs["default"] = f.default if f.default is not dataclasses.MISSING else None
        if action not in ("store_true", "store_false") and "choices" not in kwargs:
            kwargs.setdefault("metavar", flag.lstrip("-").replace("-", "_").upper())
        help_text = meta["help"]
        if kwargs.get("default") not in (None, False, True) and action is None:
            help_text += " (default: %(default)s)"
        parser.add_argument(flag, help=help_text, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """A `RunConfig` from `build_train_parser()`'s parsed flags."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)}
    values["jit_compile"] = {"auto": "auto", "true": True, "false": False}.get(
        values["jit_compile"], values["jit_compile"]
    )
    if values["prompts"] is None:
        values["prompts"] = [DEFAULT_PROMPT]
    return RunConfig(**values)
