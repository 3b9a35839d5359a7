"""The training loop driver: one call from a corpus to a trained model and its reports."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import keras
import numpy as np

from keras_primer.data import (
    ByteCodec,
    SentencePieceCodec,
    WindowDataset,
    list_text_files,
    load_splits,
    shakespeare_path,
    train_sentencepiece,
    validation_arrays,
)
from keras_primer.training.callbacks import (
    Clock,
    StepBackupAndRestore,
    TrainingLog,
    optimizer_step,
)
from keras_primer.training.distribution import JAX_KINDS
from keras_primer.training.models import MODELS, build_causal_lm
from keras_primer.training.optimizer import build_optimizer
from keras_primer.training.presets import TrainPreset, get_preset
from keras_primer.training.reporting import (
    generate_text,
    plot_learning_curve,
    read_history,
    truncate_history,
    write_json,
)

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16", "bfloat16")
TOKENIZERS = ("bytes", "sentencepiece")


@dataclass
class RunConfig:
    """Everything a training run needs; `None` fields take the preset's value.

    Attributes:
        model: `"primer_ez"`, `"transformer"` or `"feedback"`.
        out: Output folder (resumes if it holds a backup).
        data: Text file or folder; None: Tiny Shakespeare (`--data`,
            `$KERAS_PRIMER_SHAKESPEARE`, else a download if `download`).
        preset: Name in `PRESETS` (`tiny`, `cpu`, `shakespeare_char`).
        steps, batch_size, sequence_length, learning_rate, dropout,
            eval_interval, checkpoint_interval: Preset overrides.
        tokenizer: `"bytes"` or `"sentencepiece"` (trained on the corpus
            unless `spm_model` is given).
        vocabulary_size: SentencePiece vocabulary size.
        spm_model: An existing SentencePiece `.model` to use.
        val_fraction: Share of the corpus held out (its end).
        seed: Seed of the weights and of the batches.
        precision: Dtype policy (`float32`, `mixed_bfloat16`, `mixed_float16`).
        jit_compile: `"auto"`, True or False (passed to `compile`).
        distribution: `none`, `data_parallel`, `model_parallel` (JAX),
            `mirrored` (TensorFlow); see `keras_primer.training.distribution`.
        multi_host: JAX: call `keras.distribution.initialize()` first (the
            cluster comes from `KERAS_DISTRIBUTION_*` variables). Process 0
            writes to `out`, the others to `out/worker-<index>`.
        prompts: Prompts of the sample generations.
        sample_tokens: Tokens generated per prompt (0: no samples).
        verbose: Keras progress bar (1), one line per epoch (2) or nothing (0).
        download: Allow downloading Tiny Shakespeare.
        tensorboard: Write TensorBoard logs.
    """

    model: str = "primer_ez"
    out: str = "runs/train"
    data: str | None = None
    preset: "str | TrainPreset" = "tiny"
    steps: int | None = None
    batch_size: int | None = None
    sequence_length: int | None = None
    learning_rate: float | None = None
    dropout: float | None = None
    eval_interval: int | None = None
    checkpoint_interval: int | None = None
    tokenizer: str = "bytes"
    vocabulary_size: int = 1024
    spm_model: str | None = None
    val_fraction: float = 0.1
    seed: int = 0
    precision: str = "float32"
    jit_compile: str | bool = "auto"
    distribution: str = "none"
    multi_host: bool = False
    prompts: list[str] = field(default_factory=lambda: ["ROMEO:"])
    sample_tokens: int = 200
    verbose: int = 1
    download: bool = True
    tensorboard: bool = True

    def check(self) -> None:
        """Raises `ValueError` for unknown choices."""
        for name, value, allowed in (
            ("model", self.model, MODELS),
            ("tokenizer", self.tokenizer, TOKENIZERS),
            ("precision", self.precision, PRECISIONS),
        ):
            if value not in allowed:
                raise ValueError(f"Unknown {name} {value!r}. Choose one of: {', '.join(allowed)}.")
        if self.multi_host and self.distribution not in JAX_KINDS:
            raise ValueError(
                "`multi_host` (keras.distribution.initialize) needs the distribution "
                f"`data_parallel` or `model_parallel` on JAX; this run has `{self.distribution}`."
            )
        if self.multi_host and self.jit_compile is False:
            raise ValueError(
                "`multi_host` needs compiled steps: without `jit_compile` every "
                "operation would be a separate exchange between the hosts. Leave "
                "`jit_compile` at `auto` or True."
            )
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"`steps` must be at least 1. Received: {self.steps}.")


def plan_segments(start: int, total: int, interval: int) -> list[tuple[int, int, int, int]]:
    """`fit()` calls that take a run from step `start` to `total`.

    Epochs end at multiples of `interval` (evaluation points), so a resumed
    run evaluates at the same steps as an uninterrupted one. Returns
    `(first_step, initial_epoch, epochs, steps_per_epoch)` per call.
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


def _make_codec(config: RunConfig, files: list[str], out: str):
    if config.tokenizer == "bytes":
        return ByteCodec()
    saved = os.path.join(out, "tokenizer.model")
    if config.spm_model:
        return SentencePieceCodec(config.spm_model)
    if os.path.exists(saved):
        return SentencePieceCodec(saved)
    return train_sentencepiece(files, config.vocabulary_size, saved, seed=config.seed)


def _check_resume(out: str, run_info: dict) -> None:
    path = os.path.join(out, "run.json")
    if not os.path.exists(path):
        write_json(path, run_info)
        return
    with open(path) as f:
        saved = json.load(f)
    if saved.get("tokenizer") != run_info["tokenizer"]:
        raise ValueError(
            f"Vocabulary mismatch: {out} holds a run with tokenizer "
            f"{saved.get('tokenizer')}, but this run uses {run_info['tokenizer']}. "
            "Resume with the same tokenizer settings, or use a new `--out`."
        )
    for key in ("model", "architecture"):
        if saved.get(key) != run_info[key]:
            raise ValueError(
                f"{out} holds a run with {key} {saved.get(key)}, but this run has "
                f"{run_info[key]}. Resume with the same settings, or use a new `--out`."
            )


def _check_precision_runs_here(precision: str) -> None:
    """Refuses `mixed_float16` on JAX's CPU backend, where XLA has no float16
    matmul with float32 accumulation (it fails deep inside the first step)."""
    if precision != "mixed_float16" or keras.backend.backend() != "jax":
        return
    import jax

    if jax.default_backend() == "cpu":
        raise ValueError(
            "mixed_float16 does not run on JAX's CPU backend: XLA's CPU matmul has no "
            "float16 inputs with float32 accumulation. Use mixed_bfloat16 on a CPU, or "
            "mixed_float16 on a GPU."
        )


@contextlib.contextmanager
def _dtype_policy(name: str):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def train(config: RunConfig, extra_callbacks: list | None = None) -> dict:
    """Trains `config.model` on the corpus and writes every output to `config.out`.

    Outputs: `history.csv` (CSVLogger, with step, wall time, learning rate,
    tokens/s, val bits per char), `tensorboard/`, `backup/` (step-exact
    `BackupAndRestore`), `best.keras` (lowest val loss), `model.keras` (last
    step), `learning_curve.png`, `samples.txt`, `summary.json`, `run.json`
    (settings checked on resume) and `data/tokens.bin` (the encoded corpus).

    A folder that holds a backup of the same run resumes from its step.

    Args:
        config: The run's settings.
        extra_callbacks: More Keras callbacks (tests use this to interrupt).

    Returns:
        The summary dict written to `summary.json`.
    """
    from keras_primer.training.distribution import (
        distribution_scope,
        initialize_multi_host,
        worker_position,
    )

    config.check()
    if config.multi_host:
        initialize_multi_host()
    _check_precision_runs_here(config.precision)
    out = os.path.abspath(config.out)
    worker, _ = worker_position(config.distribution)
    if worker:  # process 0 writes the run's outputs; the others keep theirs apart
        out = os.path.join(out, f"worker-{worker}")
    os.makedirs(out, exist_ok=True)
    preset = get_preset(
        config.preset,
        steps=config.steps,
        batch_size=config.batch_size,
        sequence_length=config.sequence_length,
        learning_rate=config.learning_rate,
        dropout=config.dropout,
        eval_interval=config.eval_interval,
        checkpoint_interval=config.checkpoint_interval,
    )
    preset_name = config.preset if isinstance(config.preset, str) else "custom"
    total_steps = preset.steps
    interval = max(1, min(preset.eval_interval, total_steps))

    data = config.data if config.data else shakespeare_path(None, download=config.download)
    files = list_text_files(data)
    codec = _make_codec(config, files, out)
    architecture = {
        k: getattr(preset, k)
        for k in ("num_layers", "num_heads", "hidden_dim", "intermediate_dim", "sequence_length")
    }
    run_info = {
        "model": config.model,
        "tokenizer": codec.describe(),
        "architecture": architecture,
        "data": os.path.abspath(data),
    }
    _check_resume(out, run_info)
    splits = load_splits(
        data, codec, os.path.join(out, "data"), preset.sequence_length, config.val_fraction
    )
    val_x, val_y = validation_arrays(
        splits.val, preset.sequence_length, preset.eval_windows, splits.start_id
    )

    keras.utils.set_random_seed(config.seed)
    clock = Clock()
    with _dtype_policy(config.precision), distribution_scope(config.distribution) as dist:
        dist.check_batch_size(preset.batch_size)
        lm = build_causal_lm(config.model, preset, codec.keras_tokenizer())
        lm.compile(
            optimizer=build_optimizer(preset, total_steps),
            jit_compile=config.jit_compile,
            sampler=keras_hub_sampler(),
        )
        lm.optimizer.build(lm.trainable_variables)
        backup = StepBackupAndRestore(
            os.path.join(out, "backup"),
            save_freq=max(1, preset.checkpoint_interval),
            clock=clock,
        )
        metadata = backup.restore(lm)
        start = 0
        if metadata is not None:
            start = optimizer_step(lm)
            clock.offset = float(metadata.get("wall_time", 0.0))
            if config.verbose:
                print(f"Resuming {out} from step {start} of {total_steps}.")
        history_path = os.path.join(out, "history.csv")
        truncate_history(history_path, start) if start else (
            os.path.exists(history_path) and os.remove(history_path)
        )
        best_so_far = [r["val_loss"] for r in read_history(history_path) if "val_loss" in r]
        log = TrainingLog(preset.batch_size * preset.sequence_length, clock, splits.val_tokens_per_char)
        callbacks = [
            log,
            keras.callbacks.CSVLogger(history_path, append=True),
            keras.callbacks.ModelCheckpoint(
                os.path.join(out, "best.keras"),
                monitor="val_loss",
                save_best_only=True,
                initial_value_threshold=min(best_so_far) if best_so_far else None,
            ),
            backup,
        ]
        tensorboard = tensorboard_callback(os.path.join(out, "tensorboard")) if config.tensorboard else None
        if tensorboard is not None:
            callbacks.append(tensorboard)
        callbacks += list(extra_callbacks or [])

        for first, initial_epoch, epochs, per_epoch in plan_segments(start, total_steps, interval):
            dataset = WindowDataset(
                splits.train,
                preset.sequence_length,
                preset.batch_size,
                num_steps=(epochs - initial_epoch) * per_epoch,
                start_step=first,
                seed=config.seed,
                start_id=splits.start_id,
                shard=dist.input_shard,
            )
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
                callbacks=callbacks,
                verbose=config.verbose,
            )
        final_step = optimizer_step(lm)
        results = keras.Model.evaluate(
            lm,
            val_x, val_y, batch_size=dist.eval_batch_size(preset.batch_size),
            verbose=0, return_dict=True,
        )
        model_path = os.path.join(out, "model.keras")
        lm.save(model_path)
        samples = {}
        if config.sample_tokens > 0 and dist.input_shard[1] > 1:
            # keras-hub's generate reads its outputs back on the host, which a
            # batch spread over several processes does not allow.
            print("No samples in a multi-host run: generate from model.keras on one host.")
        elif config.sample_tokens > 0:
            for prompt in config.prompts:
                samples[prompt] = generate_text(lm, prompt, config.sample_tokens)
            with open(os.path.join(out, "samples.txt"), "w", encoding="utf-8") as f:
                for prompt, text in samples.items():
                    f.write(f"=== {prompt!r} ===\n{text}\n\n")

    history = read_history(history_path)
    curve = plot_learning_curve(
        history, os.path.join(out, "learning_curve.png"), f"{config.model} ({preset_name})"
    )
    val_loss = float(results["loss"])
    summary = {
        "model": config.model,
        "preset": preset_name,
        "backend": keras.backend.backend(),
        "precision": config.precision,
        "distribution": config.distribution,
        "tokenizer": codec.describe(),
        "data": os.path.abspath(data),
        "parameters": int(lm.backbone.count_params()),
        "steps": final_step,
        "resumed_from_step": start,
        "batch_size": preset.batch_size,
        "sequence_length": preset.sequence_length,
        "train_tokens": int(len(splits.train)),
        "val_tokens": int(len(splits.val)),
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, 50.0)),
        "val_bits_per_char": val_loss * splits.val_tokens_per_char / math.log(2.0),
        "best_val_loss": min([r["val_loss"] for r in history if "val_loss" in r] or [val_loss]),
        "tokens_per_second": log.tokens_per_second,
        "wall_time_s": clock(),
        "history": history,
        "samples": samples,
        "files": {
            "model": model_path,
            "best_model": os.path.join(out, "best.keras"),
            "history": history_path,
            "learning_curve": curve,
            "tensorboard": os.path.join(out, "tensorboard") if tensorboard is not None else None,
            "backup": os.path.join(out, "backup"),
        },
        "preset_settings": dataclasses.asdict(preset),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "preset"},
    }
    write_json(os.path.join(out, "summary.json"), summary)
    return summary


def tensorboard_callback(log_dir: str):
    """`keras.callbacks.TensorBoard`, or None (with a warning) when the
    `tensorboard` package is missing (TensorFlow >= 2.21 no longer installs it)."""
    import importlib.util
    import warnings

    if importlib.util.find_spec("tensorboard") is None:
        warnings.warn(
            "No TensorBoard logs: the `tensorboard` package is not installed "
            "(`pip install tensorboard`). history.csv has the same numbers.",
            stacklevel=2,
        )
        return None
    return keras.callbacks.TensorBoard(log_dir, write_graph=False)


def keras_hub_sampler():
    """Top-k sampling (k=10), a good default for small character models."""
    import keras_hub

    return keras_hub.samplers.TopKSampler(k=10, seed=0)
