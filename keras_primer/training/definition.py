"""What defines a run, and whether a rerun may continue it (stages 4 and 5
of `driver.train`).

`run_definition` is everything that makes two runs the same run (`--steps`
aside), recorded in the folder's `run.json`; `reconcile_run` compares it
with that record: a fresh run, a resume, an extension or a `--fine-tune` is
accepted (and said), any other change refused with the list of changes.
"""

from __future__ import annotations

import os

from keras_primer.training.run_dir import write_json_atomic
from keras_primer.training.run_setup import Corpus, TokenizerChoice, choose_tokenizer, note
from keras_primer_cli.errors import ConfigError
from keras_primer_cli.ownership import RUN_RECORD, read_run_record
from keras_primer_cli.presets import TrainPreset
from keras_primer_cli.run_config import RunConfig


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
    say = say or note
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
