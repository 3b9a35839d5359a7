"""The model of a run (stages 7 and 8 of `driver.train`): built, restored, saved.

`build_model` compiles the causal LM of the run's registry entry with the
run's optimizer; `restore_checkpoint` loads the newest checkpoint of the run
folder into it (the step, history rows and clock the run goes on from);
`save_model_atomic` writes a `.keras` file through a temporary sibling.
"""

from __future__ import annotations

import contextlib
import os

import keras

from keras_primer.models.registry import build_causal_lm
from keras_primer.training.callbacks import optimizer_step, sync_state, write_state
from keras_primer.training.optimizer import build_optimizer
from keras_primer.training.run_dir import commit_file, temp_path
from keras_primer.training.run_setup import Run
from keras_primer_cli.errors import ConfigError


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


@contextlib.contextmanager
def dtype_policy(name: str):
    """Runs the block under Keras' dtype policy `name` (the run's precision)."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)
