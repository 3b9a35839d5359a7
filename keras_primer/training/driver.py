"""The training driver: `train(config)` as a pipeline of named stages.

Each stage is a function with one job that can be called (and tested) alone,
in a module with one idea; `train` only hands the run from stage to stage.
The stages share one small `Run` (`run_setup`: the run's settings, folder
and what the earlier stages found) instead of long argument lists:

 1. `open_run`           (run_setup)   check the config and this process
                         (backend, precision, packages); decide the
                         tokenizer and the run's folder; nothing is written
 2. `claim_folder`       (run_dir)     `--out` is new, empty or a run folder
                         (our `run.json`); refuse anything else before any
                         work; remove what a killed run left
 3. `locate_corpus`      (run_data)    the corpus files and their content hashes
 4. `run_definition`     (definition)  everything that defines the run
 5. `reconcile_run`      (definition)  accept a fresh run, a resume, an
                         extension or a `--fine-tune`; refuse any other
                         change (with a diff)
 6. `prepare_data`       (run_data)    the codec, the (verified) token cache,
                         splits and validation windows
 7. `build_model`        (run_model)   the compiled causal LM
 8. `restore_checkpoint` (run_model)   the last committed step, its history
                         and clock
 9. `make_callbacks`     (fit_loop)    checkpoint commits, history,
                         `best.keras`, the log
10. `fit_segments`       (fit_loop)    `fit()` from that step to the last
11. `write_reports`      (reporting)   model.keras, samples, learning curve,
                         summary.json

The run folder holds one writer (`RunLock`); checkpoints, `model.keras`,
`best.keras`, `history.csv` and `run.json` are all written atomically.
`run.json` records a change (an extension, a `--fine-tune`) only once the
checkpoint it continues has been restored.
"""

from __future__ import annotations

from keras_primer.training.definition import reconcile_run, run_definition
from keras_primer.training.distribution import distribution_scope
from keras_primer.training.fit_loop import check_finite, fit_segments, make_callbacks
from keras_primer.training.reporting import write_reports
from keras_primer.training.run_data import locate_corpus, prepare_data
from keras_primer.training.run_dir import (
    RunLock,
    check_folder_owned,
    claim_folder,
    write_json_atomic,
)
from keras_primer.training.run_model import build_model, dtype_policy, restore_checkpoint
from keras_primer.training.run_setup import open_run
from keras_primer_cli.errors import printable
from keras_primer_cli.ownership import RUN_RECORD
from keras_primer_cli.run_config import RunConfig

__all__ = ["train"]


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
        claim_folder(run.out)
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
        with dtype_policy(config.precision), distribution_scope(config.distribution) as dist:
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
