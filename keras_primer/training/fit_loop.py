"""The fit loop of a run (stages 9 and 10 of `driver.train`).

`make_callbacks` sets up what runs at every step and evaluation (checkpoint
commits, history, `best.keras`, the throughput log, a Ctrl-C check);
`fit_segments` runs `fit()` from the restored step to the last, in segments
that end at evaluation points (`plan_segments`), so a resumed run sees the
same batches and evaluates at the same steps as an uninterrupted one;
`check_finite` stops a run whose loss diverged.
"""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from keras_primer.data import WindowDataset
from keras_primer.training.callbacks import RunRecorder, TrainingLog, read_state, step_seeder
from keras_primer.training.run_dir import write_history_csv
from keras_primer.training.run_model import save_model_atomic
from keras_primer.training.run_setup import Run
from keras_primer_cli.interrupts import INTERRUPTS


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


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
