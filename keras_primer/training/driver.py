"""The training driver: `train(config)` as a pipeline of named stages.

Each stage is a function with one job that can be called (and tested) alone:

1. `check_runtime`      the backend, precision and hosts can run this config
2. `resolve_preset`     the `TrainPreset` with the config's overrides
3. `optional_outputs`   which optional outputs this install can write (said once)
4. `run_folder`         the run's folder (process 0's, or a worker's)
5. `locate_corpus`      the corpus files and their content hashes
6. `run_definition`     everything that defines the run (compared on resume)
7. `reconcile_run`      accept a fresh run, a resume, an extension or a
                        `--fine-tune`; refuse any other change (with a diff)
8. `make_codec`         bytes, a given SentencePiece model, or one trained here
9. `prepare_data`       token cache, splits and validation windows
10. `build_model`       the compiled causal LM
11. `restore_checkpoint` the last committed step, its history and clock
12. `fit_segments`      `fit()` from that step to the last, committing checkpoints
13. `write_reports`     model.keras, samples, learning curve, summary.json

The run folder holds one writer (`RunLock`); checkpoints, `model.keras`,
`best.keras`, `history.csv` and `run.json` are all written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import sys
from dataclasses import dataclass

import keras
import numpy as np

from keras_primer.data import (
    ByteCodec,
    SentencePieceCodec,
    WindowDataset,
    content_fingerprint,
    keras_tokenizer,
    list_text_files,
    load_splits,
    shakespeare_path,
    train_sentencepiece,
    validation_arrays,
)
from keras_primer.models.base import PERPLEXITY_LOSS_CAP
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
from keras_primer.training.models import build_causal_lm
from keras_primer.training.optimizer import build_optimizer
from keras_primer.training.presets import TrainPreset, get_preset
from keras_primer.training.reporting import (
    generate_text,
    plot_learning_curve,
    write_json,
)
from keras_primer.training.run_dir import (
    CheckpointStore,
    RunLock,
    commit_file,
    write_history_csv,
    write_json_atomic,
)
from keras_primer_runtime.run_config import PRECISIONS, TOKENIZERS, ConfigError, RunConfig

__all__ = ["RunConfig", "train", "plan_segments", "PRECISIONS", "TOKENIZERS"]


class TrainingDiverged(ValueError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------- stages


def check_runtime(config: RunConfig) -> None:
    """Checks that this process can run `config` (call after `config.validate()`).

    Raises:
        ConfigError: A package the tokenizer needs is missing, Keras runs
            another backend than `config.backend`, or
            `mixed_float16` on JAX's CPU backend (no float16 matmul with
            float32 accumulation in XLA's CPU backend).
    """
    if config.tokenizer == "sentencepiece":
        for package, pip in (
            ("sentencepiece", "sentencepiece"),
            ("tensorflow_text", "tensorflow-text"),
        ):
            if not _installed(package):
                raise ConfigError(
                    f"--tokenizer sentencepiece needs the `{package}` package, which is not "
                    f"installed: `pip install {pip}` (or keras-primer[text]), or use --tokenizer bytes."
                )
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


def resolve_preset(config: RunConfig) -> TrainPreset:
    """The run's `TrainPreset`: `config.preset` with the config's overrides."""
    return get_preset(
        config.preset,
        steps=config.steps,
        batch_size=config.batch_size,
        sequence_length=config.sequence_length,
        learning_rate=config.learning_rate,
        dropout=config.dropout,
        eval_interval=config.eval_interval,
        checkpoint_interval=config.checkpoint_interval,
    )


def optional_outputs(config: RunConfig, say=None) -> dict:
    """Which optional outputs this install can write; says once what it skips.

    Returns `{"learning_curve": bool, "tensorboard": bool}`.
    """
    say = say or _note
    have_plot = _installed("matplotlib")
    have_tb = config.tensorboard and _installed("tensorboard")
    skipped = []
    if not have_plot:
        skipped.append("learning_curve.png (matplotlib is not installed)")
    if config.tensorboard and not have_tb:
        skipped.append("TensorBoard logs (tensorboard is not installed)")
    if skipped:
        say(
            "this run will skip " + " and ".join(skipped) + "; history.csv has the same "
            "numbers. `pip install keras-primer[train]` adds them."
        )
    return {"learning_curve": have_plot, "tensorboard": have_tb}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def run_folder(config: RunConfig) -> str:
    """The absolute folder this process writes: `config.out`, or
    `config.out/worker-<i>` for process `i > 0` of a multi-host run."""
    from keras_primer.training.distribution import worker_position

    out = os.path.abspath(os.path.expanduser(config.out))
    worker, _ = worker_position(config.distribution)
    return os.path.join(out, f"worker-{worker}") if worker else out


@dataclass
class Corpus:
    """The corpus of a run: its path, files and `[name, bytes, sha256]` per file."""

    path: str
    files: list
    fingerprint: list


def locate_corpus(config: RunConfig) -> Corpus:
    """The corpus files and their content hashes (Tiny Shakespeare by default)."""
    data = config.data if config.data else shakespeare_path(None, download=config.download)
    path = os.path.abspath(os.path.expanduser(data))
    files = list_text_files(path)
    root = path if os.path.isdir(path) else os.path.dirname(path)
    fingerprint = [
        [os.path.relpath(f, root), size, sha] for f, size, sha in content_fingerprint(files)
    ]
    return Corpus(path, files, fingerprint)


def run_definition(config: RunConfig, preset: TrainPreset, corpus: Corpus) -> dict:
    """Everything that makes two runs the same run (`--steps` aside).

    Compared on resume: data (content hashes, not names or dates), tokenizer,
    model, architecture, seed, batch size, schedule, evaluation and precision.
    """
    tokenizer = {"kind": config.tokenizer}
    if config.tokenizer == "sentencepiece":
        if config.spm_model:
            tokenizer["model_sha256"] = content_fingerprint([config.spm_model])[0][2]
        else:
            tokenizer["vocabulary_size"] = config.vocabulary_size
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
        "tokenizer": tokenizer,
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
) -> dict:
    """Decides whether this run may write `out`; writes `run.json` (atomically).

    A folder without a checkpoint starts afresh. With one, the definition
    must match, except with `fine_tune` (recorded with its step), and only
    if the model, architecture and tokenizer are unchanged. A larger
    `total_steps` extends the run (said); one below the checkpoint is refused.

    Returns:
        The run record written to `run.json`.

    Raises:
        ConfigError: The change is refused; the message has the diff and
            the two ways forward.
    """
    say = say or _note
    path = os.path.join(out, "run.json")
    saved = None
    if committed_step is not None and os.path.exists(path):
        import json

        with open(path) as f:
            saved = json.load(f)
    if saved is None:
        if committed_step is not None:
            raise ConfigError(
                f"{out} holds checkpoints but no run.json, so what they continue is unknown. "
                "Pass another --out, or move the checkpoints/ folder away to start afresh."
            )
        record = {"definition": definition, "steps": total_steps, "changes": []}
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
    if record != saved:
        write_json_atomic(path, record)
    return record


def make_codec(config: RunConfig, corpus: Corpus, out: str):
    """The run's codec: bytes, `config.spm_model`, the run's saved SentencePiece
    model, or a new one trained on the corpus (saved as `tokenizer.model`)."""
    if config.tokenizer == "bytes":
        return ByteCodec()
    if config.spm_model:
        return SentencePieceCodec(config.spm_model)
    saved = os.path.join(out, "tokenizer.model")
    if os.path.exists(saved):
        codec = SentencePieceCodec(saved)
        if codec.vocabulary_size == config.vocabulary_size:
            return codec
    return train_sentencepiece(corpus.files, config.vocabulary_size, saved, seed=config.seed)


def prepare_data(config: RunConfig, preset: TrainPreset, corpus: Corpus, codec, out: str):
    """Tokenizes (or reuses) the corpus; returns `(splits, (val_x, val_y))`."""
    splits = load_splits(
        corpus.path,
        codec,
        os.path.join(out, "data"),
        preset.sequence_length,
        config.val_fraction,
        fingerprint=corpus.fingerprint,
    )
    val = validation_arrays(
        splits.val, preset.sequence_length, preset.eval_windows, splits.start_id
    )
    return splits, val


def build_model(config: RunConfig, preset: TrainPreset, codec, total_steps: int):
    """The compiled causal LM with its optimizer built (variables exist)."""
    keras.utils.set_random_seed(config.seed)
    lm = build_causal_lm(config.model, preset, keras_tokenizer(codec))
    lm.compile(
        optimizer=build_optimizer(preset, total_steps),
        jit_compile=config.jit_compile,
        sampler=keras_hub_sampler(),
    )
    lm.optimizer.build(lm.trainable_variables)
    return lm


def restore_checkpoint(store: CheckpointStore, lm) -> tuple[int, list, float]:
    """Loads the newest checkpoint into `lm`; returns `(step, history rows, wall time)`
    (`(0, [], 0.0)` without one)."""
    checkpoint = store.load_latest()
    if checkpoint is None:
        return 0, [], 0.0
    step = checkpoint["step"]
    write_state(lm, checkpoint["arrays"], store.path(step))
    if optimizer_step(lm) != step:
        raise ConfigError(
            f"Checkpoint {store.path(step)} is inconsistent: named step {step}, its optimizer "
            f"is at step {optimizer_step(lm)}. Move it away, or pass another --out."
        )
    state = checkpoint["state"]
    return step, list(state.get("history", [])), float(state.get("wall_time", 0.0))


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
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.tmp-{os.getpid()}.keras")
    try:
        lm.save(tmp)
        commit_file(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def fit_segments(
    lm, config, preset, splits, val, dist, start, total_steps, interval, callbacks, recorder
) -> None:
    """Runs `fit()` from `start` to `total_steps`; the batches of step `s` are
    a function of `(seed, s)` alone, so a resumed run sees the same ones."""
    val_x, val_y = val
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
        recorder.step = first
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
        if recorder.nan_step is not None:
            return


def write_reports(
    config, preset, lm, dist, out, corpus, codec, splits, val, history, start, log, clock, outputs
) -> dict:
    """Final evaluation, `model.keras`, samples, learning curve and `summary.json`."""
    val_x, val_y = val
    final_step = optimizer_step(lm)
    results = keras.Model.evaluate(
        lm,
        val_x,
        val_y,
        batch_size=dist.eval_batch_size(preset.batch_size),
        verbose=0,
        return_dict=True,
    )
    model_path = os.path.join(out, "model.keras")
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
        from keras_primer.training.run_dir import atomic_write

        with atomic_write(os.path.join(out, "samples.txt"), "w") as f:
            f.write(text)
    preset_name = config.preset if isinstance(config.preset, str) else "custom"
    curve = None
    if outputs["learning_curve"]:
        curve = plot_learning_curve(
            history, os.path.join(out, "learning_curve.png"), f"{config.model} ({preset_name})"
        )
    val_loss = float(results["loss"])
    losses = [r["val_loss"] for r in history if "val_loss" in r]
    summary = {
        "model": config.model,
        "preset": preset_name,
        "backend": keras.backend.backend(),
        "precision": config.precision,
        "distribution": config.distribution,
        "tokenizer": codec.describe(),
        "data": corpus.path,
        "parameters": int(lm.backbone.count_params()),
        "steps": final_step,
        "resumed_from_step": start,
        "batch_size": preset.batch_size,
        "sequence_length": preset.sequence_length,
        "train_tokens": int(len(splits.train)),
        "val_tokens": int(len(splits.val)),
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, PERPLEXITY_LOSS_CAP)),
        "val_bits_per_char": val_loss * splits.val_tokens_per_char / math.log(2.0),
        "best_val_loss": min(losses or [val_loss]),
        "tokens_per_second": log.tokens_per_second,
        "wall_time_s": clock(),
        "history": history,
        "samples": samples,
        "files": {
            "model": model_path,
            "best_model": os.path.join(out, "best.keras"),
            "history": os.path.join(out, "history.csv"),
            "learning_curve": curve,
            "tensorboard": os.path.join(out, "tensorboard") if outputs["tensorboard"] else None,
            "checkpoints": os.path.join(out, "checkpoints"),
        },
        "preset_settings": dataclasses.asdict(preset),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "preset"},
    }
    write_json(os.path.join(out, "summary.json"), summary)
    return summary


# ----------------------------------------------------------------- pipeline


def train(config: RunConfig, extra_callbacks: list | None = None) -> dict:
    """Trains `config.model` on the corpus and writes every output to `config.out`.

    Outputs: `checkpoints/step-<N>.npz` (atomic commits of the whole
    training state and history), `history.csv`, `best.keras` (lowest val
    loss), `model.keras` (last step), `learning_curve.png`, `samples.txt`,
    `summary.json`, `run.json` (the run's definition, checked on resume),
    `tensorboard/` and `data/tokens.bin` (the encoded corpus).

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
    from keras_primer.training.distribution import distribution_scope, initialize_multi_host

    config.validate()
    check_runtime(config)
    if config.multi_host:
        initialize_multi_host()
    preset = resolve_preset(config)
    total_steps = preset.steps
    interval = max(1, min(preset.eval_interval, total_steps))
    checkpoint_interval = max(1, preset.checkpoint_interval)
    outputs = optional_outputs(config)
    out = run_folder(config)
    with RunLock(out):
        _refuse_old_layout(out)
        store = CheckpointStore(os.path.join(out, "checkpoints"))
        store.remove_leftovers()
        corpus = locate_corpus(config)
        definition = run_definition(config, preset, corpus)
        committed = store.steps()
        reconcile_run(
            out,
            definition,
            total_steps,
            committed[-1] if committed else None,
            fine_tune=config.fine_tune,
        )
        codec = make_codec(config, corpus, out)
        splits, val = prepare_data(config, preset, corpus, codec, out)
        clock = Clock()
        with _dtype_policy(config.precision), distribution_scope(config.distribution) as dist:
            dist.check_batch_size(preset.batch_size)
            lm = build_model(config, preset, codec, total_steps)
            start, rows, clock.offset = restore_checkpoint(store, lm)
            if start and config.verbose:
                print(f"Resuming {out} from step {start} of {total_steps}.")
            history_path = os.path.join(out, "history.csv")
            write_history_csv(history_path, rows)

            def commit(step, history) -> bool:
                state = read_state(lm)
                if not all(np.isfinite(a).all() for a in state if a.dtype.kind == "f"):
                    return False  # never commit weights that diverged
                store.commit(
                    step,
                    state,
                    {
                        "history": history,
                        "wall_time": clock(),
                        "data_position": {"seed": config.seed, "step": step},
                    },
                )
                return True

            log = TrainingLog(
                preset.batch_size * preset.sequence_length, clock, splits.val_tokens_per_char
            )
            recorder = RunRecorder(
                commit=commit,
                write_history=lambda history: write_history_csv(history_path, history),
                save_best=lambda: save_model_atomic(lm, os.path.join(out, "best.keras")),
                rows=rows,
                start_step=start,
                total_steps=total_steps,
                checkpoint_interval=checkpoint_interval,
                eval_interval=interval,
                reseed=step_seeder(config.seed),
            )
            callbacks = [log, recorder]
            if outputs["tensorboard"]:
                callbacks.append(
                    keras.callbacks.TensorBoard(os.path.join(out, "tensorboard"), write_graph=False)
                )
            callbacks += list(extra_callbacks or [])
            fit_segments(
                lm,
                config,
                preset,
                splits,
                val,
                dist,
                start,
                total_steps,
                interval,
                callbacks,
                recorder,
            )
            if recorder.nan_step is not None:
                last = store.steps()
                raise TrainingDiverged(
                    f"The loss became NaN or infinite at step {recorder.nan_step}; stopped. "
                    + (
                        f"The last good checkpoint (step {last[-1]}) is kept in {store.folder}. "
                        if last
                        else "No checkpoint was written before it. "
                    )
                    + "Lower --learning-rate (with --fine-tune to continue the checkpoint), "
                    "or check the data."
                )
            return write_reports(
                config,
                preset,
                lm,
                dist,
                out,
                corpus,
                codec,
                splits,
                val,
                recorder.rows,
                start,
                log,
                clock,
                outputs,
            )


def _refuse_old_layout(out: str) -> None:
    if os.path.isdir(os.path.join(out, "backup")) and not os.path.isdir(
        os.path.join(out, "checkpoints")
    ):
        raise ConfigError(
            f"{out} was written by an older keras-primer (a backup/ folder, no checkpoints/), "
            "which this version cannot resume safely. Pass another --out."
        )


def _note(message: str) -> None:
    print(f"keras-primer train: note: {message}", file=sys.stderr)


@contextlib.contextmanager
def _dtype_policy(name: str):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def keras_hub_sampler():
    """Top-k sampling (k=10), a good default for small character models."""
    import keras_hub

    return keras_hub.samplers.TopKSampler(k=10, seed=0)
