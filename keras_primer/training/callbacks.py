"""Callbacks of a training run: checkpoints and history, and a step/time/throughput log."""

from __future__ import annotations

import math
import time

import keras
import numpy as np

from keras_primer.training.run_dir import fault_point


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


def model_state(model) -> list:
    """Every variable of `model` and of its optimizer, in a fixed order.

    The model's variables include the seed-generator states (dropout's RNG),
    so a restored run draws the same random numbers as an uninterrupted one.
    """
    return list(model.variables) + list(model.optimizer.variables)


def read_state(model) -> list[np.ndarray]:
    """The values of `model_state(model)` as NumPy arrays (synced on JAX first)."""
    sync_state(model)
    # The variable itself, not `.value`: a MirroredStrategy aggregate has no array value.
    return [np.asarray(keras.ops.convert_to_numpy(v)) for v in model_state(model)]


def write_state(
    model, arrays: list[np.ndarray], source: str, written_on: str | None = None
) -> None:
    """Assigns `arrays` (from `read_state`) back to `model_state(model)`.

    Integer counters (the optimizer's step, seed states) are cast to the
    variable's integer dtype when their values fit, so a checkpoint written
    on one backend resumes on another (their counters' widths differ).

    Args:
        model: The compiled model.
        arrays: The values, in `model_state` order.
        source: The checkpoint file (for messages).
        written_on: The backend the checkpoint was written on, if recorded.

    Raises:
        ValueError: The arrays do not fit the variables (another model or
            optimizer); the message names `source` and both backends.
    """
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    variables = model_state(model)
    count = len(arrays)
    count_differs = len(variables) != count
    arrays = [_fit_integers(a, np.dtype(v.dtype)) for v, a in zip(variables, arrays)]
    mismatch = count_differs or next(
        (
            f"{v.path}: {tuple(v.shape)} {v.dtype} vs {a.shape} {a.dtype}"
            for v, a in zip(variables, arrays)
            if tuple(v.shape) != a.shape or np.dtype(v.dtype) != a.dtype
        ),
        None,
    )
    if mismatch:
        detail = (
            mismatch
            if isinstance(mismatch, str)
            else f"{count} arrays for {len(variables)} variables"
        )
        running = keras.backend.backend()
        where = (
            f"; it was written on the {written_on} backend, this process runs {running}"
            if written_on and written_on != running
            else ""
        )
        raise ValueError(
            f"Checkpoint {source} does not fit this model and optimizer ({detail}{where}). "
            "Use the settings (and backend) it was written with, or another --out."
        )
    for variable, array in zip(variables, arrays):
        variable.assign(array)


def _fit_integers(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` as `dtype` if both are integers and every value fits, else unchanged."""
    if array.dtype == dtype or array.dtype.kind not in "iu" or dtype.kind not in "iu":
        return array
    cast = array.astype(dtype)
    return cast if np.array_equal(cast, array) else array


def step_seeder(seed: int):
    """A function that makes step `s`'s global random draws a function of `(seed, s)`, or None.

    On PyTorch, Keras draws unseeded dropout (a `Dropout` without `seed`)
    from torch's global generator, which data loaders also advance; seeding
    it per step makes a resumed run draw what an uninterrupted one does.
    The other backends use seed-generator variables, which checkpoints hold.
    """
    if keras.backend.backend() != "torch":
        return None
    import torch

    def reseed(step: int) -> None:
        torch.manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))

    return reseed


class RunRecorder(keras.callbacks.Callback):
    """Commits checkpoints, keeps the history, saves `best.keras`, stops on NaN.

    * At every multiple of `checkpoint_interval` and at the last step, the
      whole training state and the history rows so far are committed in one
      atomic file (`commit(step, rows)`); at a step that is also an
      evaluation point, after its row.
    * At every evaluation the row goes into the history and `history.csv`
      is rewritten (atomically); a new lowest `val_loss` saves `best.keras`
      (atomically).
    * A loss that is not finite stops training (`nan_step` says where) and
      nothing more is committed, so the last checkpoint is the last good one.

    A row's training `loss` is the mean over the batches run in its epoch
    since the last (re)start; the validation columns do not depend on it.

    Put it after `TrainingLog` (which adds `step` and the other columns).

    Args:
        commit: `commit(step, rows)`: writes a checkpoint; returns False
            (and writes nothing) when the state is not finite.
        write_history: `write_history(rows)`: the history view.
        save_best: `save_best()`: writes `best.keras`.
        rows: History rows already committed (a resumed run).
        start_step: The step training starts from.
        total_steps: The last step.
        checkpoint_interval: Steps between checkpoints.
        eval_interval: Steps between evaluations (epoch ends).
        reseed: `reseed(step)` before each step (`step_seeder`), or None.
    """

    def __init__(
        self,
        commit,
        write_history,
        save_best,
        rows,
        start_step,
        total_steps,
        checkpoint_interval,
        eval_interval,
        reseed=None,
    ):
        super().__init__()
        self.reseed = reseed
        self.commit = commit
        self.write_history = write_history
        self.save_best = save_best
        self.rows = list(rows)
        self.step = int(start_step)
        self.total_steps = int(total_steps)
        self.checkpoint_interval = int(checkpoint_interval)
        self.eval_interval = int(eval_interval)
        self.nan_step = None
        losses = [r["val_loss"] for r in self.rows if _finite(r.get("val_loss"))]
        self.best = min(losses) if losses else math.inf

    def _is_epoch_end(self, step: int) -> bool:
        return step % self.eval_interval == 0 or step == self.total_steps

    def _due(self, step: int) -> bool:
        return step % self.checkpoint_interval == 0 or step == self.total_steps

    def on_train_batch_begin(self, batch, logs=None):
        if self.reseed is not None:
            self.reseed(self.step + 1)

    def on_train_batch_end(self, batch, logs=None):
        if self.nan_step is not None:
            return
        self.step += 1
        if logs and "loss" in logs and not _finite(logs["loss"]):
            self.nan_step = self.step
            self.model.stop_training = True
            return
        if self._due(self.step) and not self._is_epoch_end(self.step):
            self._commit()

    def on_epoch_end(self, epoch, logs=None):
        if self.nan_step is not None or logs is None:
            return
        row = {k: _plain(v) for k, v in logs.items()}
        if not all(_finite(row.get(k)) for k in ("loss", "val_loss") if k in row):
            self.nan_step = self.step
            self.model.stop_training = True
            return
        self.rows.append(row)
        self.write_history(self.rows)
        fault_point(self.step, "after_history")
        if "val_loss" in row and row["val_loss"] < self.best:
            self.best = row["val_loss"]
            self.save_best()
            fault_point(self.step, "after_best")
        if self._due(self.step):
            self._commit()

    def _commit(self):
        if self.commit(self.step, self.rows) is False:  # the state is not finite
            self.nan_step = self.step
            self.model.stop_training = True


def _plain(value):
    try:
        value = float(keras.ops.convert_to_numpy(value))
    except (TypeError, ValueError):
        return value
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


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
