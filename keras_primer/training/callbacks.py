"""Callbacks of a training run: step-exact backups and a step/time/throughput log."""

from __future__ import annotations

import json
import math
import os
import time

import keras


def sync_state(model) -> None:
    """Writes JAX's in-flight training state back into the model's variables.

    During `fit()` on JAX the variables are only updated at epoch ends; a
    callback that reads or saves them mid-epoch must sync first.
    """
    if getattr(model, "_jax_state", None) is not None and hasattr(model, "jax_state_sync"):
        model.jax_state_sync()


def optimizer_step(model) -> int:
    """Optimizer steps taken so far (the global training step)."""
    sync_state(model)
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class Clock:
    """Wall-clock seconds of a run, carried across resumes."""

    def __init__(self, elapsed: float = 0.0):
        self.offset = float(elapsed)
        self.start = time.perf_counter()

    def __call__(self) -> float:
        return self.offset + time.perf_counter() - self.start


class StepBackupAndRestore(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` that resumes at the exact optimizer step.

    Keras' callback restores the weights (optimizer state included) but
    restarts the interrupted epoch from its first batch. This one records the
    global step (and the run's wall time) with every backup; the driver calls
    `restore()` before `fit()` and feeds the batches from that step on, so a
    run killed mid-epoch loses only the steps after its last backup and sees
    exactly the batches an uninterrupted run would. The backup is kept after
    training (`delete_checkpoint=False`) so a finished run can be extended
    with more `--steps`.

    Args:
        backup_dir: Folder of the backup (used by nothing else).
        save_freq: Back up every this many batches.
        clock: A `Clock` whose reading is saved as `wall_time`.
    """

    def __init__(self, backup_dir: str, save_freq: int, clock: Clock | None = None):
        super().__init__(backup_dir, save_freq=int(save_freq), delete_checkpoint=False)
        self.clock = clock or Clock()

    def on_train_begin(self, logs=None):
        # The driver restores before fit (it must know the step to pick the data).
        pass

    def read_metadata(self) -> dict | None:
        """The saved `{"step", "epoch", "wall_time"}`, or None without a backup."""
        if not (os.path.exists(self._weights_path) and os.path.exists(self._training_metadata_path)):
            return None
        with open(self._training_metadata_path) as f:
            return json.load(f)

    def restore(self, model) -> dict | None:
        """Loads the backup into `model` (built, compiled); returns its metadata."""
        metadata = self.read_metadata()
        if metadata is None:
            return None
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self._weights_path)
        step = optimizer_step(model)
        if step != metadata.get("step", step):
            raise ValueError(
                f"Backup in {self.backup_dir} is inconsistent: metadata says step "
                f"{metadata['step']}, the optimizer says {step}."
            )
        return metadata

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        sync_state(self.model)
        self.model.save_weights(filepath=self._weights_path + ".tmp.weights.h5", overwrite=True)
        os.replace(self._weights_path + ".tmp.weights.h5", self._weights_path)
        metadata = {
            "step": optimizer_step(self.model),
            "epoch": self._current_epoch,
            "wall_time": self.clock(),
        }
        with open(self._training_metadata_path + ".tmp", "w") as f:
            json.dump(metadata, f)
        os.replace(self._training_metadata_path + ".tmp", self._training_metadata_path)

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch


class TrainingLog(keras.callbacks.Callback):
    """Adds `step`, `wall_time`, `learning_rate`, `tokens_per_second` and
    `val_bits_per_char` to the epoch logs (put it before `CSVLogger`).

    Throughput is measured between consecutive batches, leaving out the first
    batch of every `fit()` (compilation) and validation.

    Args:
        tokens_per_batch: `batch_size * sequence_length`.
        clock: The run's `Clock`.
        tokens_per_char: Validation ids per character of text (bits per
            character = loss / ln 2 * tokens_per_char).
    """

    def __init__(self, tokens_per_batch: int, clock: Clock, tokens_per_char: float = 1.0):
        super().__init__()
        self.tokens_per_batch = tokens_per_batch
        self.clock = clock
        self.tokens_per_char = tokens_per_char
        self.train_seconds = 0.0
        self.timed_batches = 0
        self._last = None

    @property
    def tokens_per_second(self) -> float:
        if not self.timed_batches:
            return float("nan")
        return self.timed_batches * self.tokens_per_batch / self.train_seconds

    def on_train_begin(self, logs=None):
        self._last = None

    def on_epoch_begin(self, epoch, logs=None):
        self._last = None if self._last is None else time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._last is not None:
            self.train_seconds += now - self._last
            self.timed_batches += 1
        self._last = now

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        optimizer = self.model.optimizer
        step = optimizer_step(self.model)
        logs["step"] = step
        logs["wall_time"] = round(self.clock(), 3)
        lr = optimizer.learning_rate
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(lr))
        logs["tokens_per_second"] = self.tokens_per_second
        if "val_loss" in logs:
            logs["val_bits_per_char"] = (
                float(logs["val_loss"]) * self.tokens_per_char / math.log(2.0)
            )
        self._last = time.perf_counter()
