"""The report of a comparison (`compare`): rows, tables and plots.

For every model, against the reference's final validation loss (keras-hub
GPT-2 when it trains, else our Transformer baseline, else the Feedback
Transformer): the steps and wall-clock seconds it needs to reach it and
those as fractions of the reference's own (`comparison_rows`); over several
seeds, every seed's figures and their mean, standard deviation and range
(`report_seeds`). Written as `comparison.csv`, `.md`, `.json` and `.png`.
"""

from __future__ import annotations

import csv
import math
import os

from keras_primer.training.reporting import write_json

# The model a Keras user would otherwise train: the target when it trains.
REFERENCE = "gpt2"
# The target of a comparison without GPT-2.
BASELINE = "transformer"
# The possible targets, first present wins, with their names in reports: the
# Feedback Transformer is the baseline of Feedback + MDHA (`feedback_primer_ez`).
REFERENCES = {
    REFERENCE: "keras-hub GPT-2",
    BASELINE: "our Transformer",
    "feedback": "our Feedback Transformer",
}


def reference_model(models) -> str | None:
    """The model whose final validation loss is every model's target: the
    first of `REFERENCES` that trains (`gpt2`, else the Transformer
    baseline, else the Feedback Transformer), else None.

    >>> reference_model(["primer_ez", "transformer", "gpt2"])
    'gpt2'
    >>> reference_model(["primer_ez", "transformer"])
    'transformer'
    >>> reference_model(["feedback_primer_ez", "feedback"])
    'feedback'
    """
    for model in REFERENCES:
        if model in models:
            return model
    return None


def steps_to_reach(history: list[dict], target: float, key: str = "step") -> float | None:
    """`key` (`"step"` or `"wall_time"`) at which `val_loss` first falls to
    `target`, linearly interpolated between the evaluation before and the
    first one at or below it; the first evaluation's own `key` when it is
    already there (nothing is known before it); None if never.

    >>> rows = [{"step": 10, "val_loss": 3.0}, {"step": 20, "val_loss": 2.0}]
    >>> steps_to_reach(rows, 2.5), steps_to_reach(rows, 3.5), steps_to_reach(rows, 1.0)
    (15.0, 10.0, None)
    """
    previous = None
    for row in history:
        if "val_loss" not in row:
            continue
        x, loss = row[key], row["val_loss"]
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(x)
            x0, l0 = previous
            return float(x0 + (l0 - target) / (l0 - loss) * (x - x0))
        previous = (x, loss)
    return None


def report(summaries: dict, out: str) -> dict:
    """Writes `comparison.csv`, `.md`, `.json` and `.png` (validation loss vs
    steps and vs wall-clock seconds) for one seed's finished runs.

    The columns are those of `comparison_rows`.

    Returns:
        `{"reference", "rows", "primer_step_ratio", "primer_time_ratio"}`:
        the ratios are Primer EZ's `step_ratio` and `time_ratio` (None: not
        reached, or no Primer EZ run).
    """
    reference = reference_model(list(summaries))
    rows = comparison_rows(summaries)
    primer = next((r for r in rows if r["model"] == "primer_ez"), {})
    step_ratio, time_ratio = primer.get("step_ratio"), primer.get("time_ratio")
    _write_csv(os.path.join(out, "comparison.csv"), rows)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(_markdown_table(rows))
        f.write(
            _legend(reference)
            + "\nPrimer EZ: "
            + (
                "not reached"
                if step_ratio is None
                else f"{step_ratio}x the steps, {time_ratio}x the wall-clock"
            )
            + "\n"
        )
    _plot({None: summaries}, os.path.join(out, "comparison.png"))
    result = {
        "reference": reference,
        "rows": rows,
        "primer_step_ratio": step_ratio,
        "primer_time_ratio": time_ratio,
    }
    write_json(os.path.join(out, "comparison.json"), result)
    return result


def comparison_rows(summaries: dict) -> list[dict]:
    """One row per model of one seed's finished runs.

    Against the reference (`reference_model`) run's final validation loss:
    `steps_to_target` and `seconds_to_target` (where the model's validation
    curve first reaches it, see `steps_to_reach`), and `step_ratio` and
    `time_ratio`, those divided by the reference's own steps and by the
    wall-clock seconds of its last evaluation. `train_time_ratio` is
    `step_ratio` scaled by the two runs' training tokens/s: the time ratio
    of the training steps alone, without compilation and evaluation (which
    dominate the wall-clock of short runs). All are None when the model
    never reaches the target, or no reference trained.
    """
    reference = reference_model(list(summaries))
    ref = summaries.get(reference)
    rows = []
    for model, s in summaries.items():
        row = {
            "model": model,
            "parameters": s["parameters"],
            "steps": s["steps"],
            "val_loss": round(s["val_loss"], 4),
            "val_bits_per_char": round(s["val_bits_per_char"], 4),
            "tokens_per_second": (
                round(s["tokens_per_second"], 1) if _positive(s["tokens_per_second"]) else None
            ),
            "wall_time_s": round(s["wall_time_s"], 1),
            "steps_to_target": None,
            "seconds_to_target": None,
            "step_ratio": None,
            "time_ratio": None,
            "train_time_ratio": None,
        }
        if ref is not None:
            target = ref["val_loss"]
            steps = steps_to_reach(s["history"], target)
            seconds = steps_to_reach(s["history"], target, key="wall_time")
            ref_seconds = [r["wall_time"] for r in ref["history"] if "val_loss" in r][-1]
            if steps is not None:
                row["steps_to_target"] = round(steps, 1)
                row["seconds_to_target"] = round(seconds, 1)
                row["step_ratio"] = round(steps / ref["steps"], 3)
                row["time_ratio"] = round(seconds / ref_seconds, 3)
                speeds = (s["tokens_per_second"], ref["tokens_per_second"])
                if all(_positive(v) for v in speeds):
                    ratio = steps / ref["steps"] * speeds[1] / speeds[0]
                    row["train_time_ratio"] = round(ratio, 3)
        rows.append(row)
    return rows


# Columns summarised over seeds (each model's mean, std, min and max).
SPREAD_COLUMNS = (
    "val_loss",
    "val_bits_per_char",
    "steps_to_target",
    "seconds_to_target",
    "step_ratio",
    "time_ratio",
    "train_time_ratio",
)


def spread(values: list[float | None]) -> dict:
    """Mean, sample standard deviation (n - 1), min and max of the values
    that are not None; `n` counts them and `missing` the Nones (a model that
    never reached the reference's loss in that seed).

    The std is None below 2 values (one seed says nothing about the spread);
    every statistic is None when no value is left.

    >>> spread([0.5, 0.7, None])
    {'n': 2, 'missing': 1, 'mean': 0.6, 'std': 0.1414, 'min': 0.5, 'max': 0.7}
    """
    kept = [float(v) for v in values if v is not None]
    n = len(kept)
    mean = sum(kept) / n if n else None
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (n - 1)) if n >= 2 else None
    return {
        "n": n,
        "missing": len(values) - n,
        "mean": None if mean is None else round(mean, 4),
        "std": None if std is None else round(std, 4),
        "min": min(kept) if kept else None,
        "max": max(kept) if kept else None,
    }


def report_seeds(by_seed: dict, out: str) -> dict:
    """`report` over several seeds: `by_seed` is `{seed: {model: summary}}`.

    Each seed's targets are that seed's reference run (same weights seed,
    same batches). Writes `comparison.csv` (a row per seed and model, then a
    `mean`, `std`, `min` and `max` row per model), `.md`, `.json` and `.png`
    (every seed's curves).

    Returns:
        `{"seeds", "reference", "rows", "spread", "per_seed",
        "primer_step_ratio", "primer_time_ratio", "primer_train_time_ratio"}`
        and a `_spread` of each ratio: `spread[model][column]` is `spread` of
        that column over the seeds; `per_seed` maps each seed to Primer EZ's
        `{"step_ratio", "time_ratio", "train_time_ratio"}` (None: not
        reached); the ratios are their means over the seeds where the target
        was reached.

    Raises:
        ValueError: The seeds do not all train the same models.
    """
    seeds = list(by_seed)
    model_sets = {tuple(summaries) for summaries in by_seed.values()}
    if len(model_sets) > 1:
        raise ValueError(
            f"Every seed must train the same models; got {sorted(model_sets)}. "
            "Finish the missing runs or leave their seeds out."
        )
    rows = []
    for seed, summaries in by_seed.items():
        rows += [{"seed": seed, **row} for row in comparison_rows(summaries)]
    models = list(dict.fromkeys(row["model"] for row in rows))
    reference = reference_model(models)
    spreads = {
        model: {
            column: spread([r[column] for r in rows if r["model"] == model])
            for column in SPREAD_COLUMNS
        }
        for model in models
    }
    primer = {r["seed"]: r for r in rows if r["model"] == "primer_ez"}
    per_seed = {
        seed: {
            "step_ratio": primer.get(seed, {}).get("step_ratio"),
            "time_ratio": primer.get(seed, {}).get("time_ratio"),
            "train_time_ratio": primer.get(seed, {}).get("train_time_ratio"),
        }
        for seed in seeds
    }
    step_ratio = spread([r["step_ratio"] for r in per_seed.values()] if primer else [])
    time_ratio = spread([r["time_ratio"] for r in per_seed.values()] if primer else [])
    train_time_ratio = spread([r["train_time_ratio"] for r in per_seed.values()] if primer else [])
    summary_rows = [
        {"seed": stat, "model": model}
        | {column: spreads[model][column][stat] for column in SPREAD_COLUMNS}
        for model in models
        for stat in ("mean", "std", "min", "max")
    ]
    _write_csv(os.path.join(out, "comparison.csv"), rows + summary_rows)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(f"Seeds: {', '.join(str(s) for s in seeds)}\n\n")
        f.write(_markdown_table(rows))
        f.write(
            "\nOver the seeds (mean ± sample std [min, max]; n: seeds counted when some "
            "did not reach the target):\n\n"
        )
        f.write(
            _markdown_table(
                [
                    {"model": model}
                    | {
                        column: _describe(spreads[model][column], len(seeds))
                        for column in SPREAD_COLUMNS
                    }
                    for model in models
                ]
            )
        )
        f.write(_legend(reference))
        if primer:
            f.write(
                "\nPrimer EZ per seed (steps, wall-clock): "
                + ", ".join(
                    f"{seed}: "
                    + (
                        "not reached"
                        if r["step_ratio"] is None
                        else f"{r['step_ratio']}x, {r['time_ratio']}x"
                    )
                    for seed, r in per_seed.items()
                )
                + f"\nPrimer EZ step ratio: {_describe(step_ratio, len(seeds))}"
                + f"\nPrimer EZ time ratio: {_describe(time_ratio, len(seeds))}"
                + "\nPrimer EZ training-time ratio: "
                + f"{_describe(train_time_ratio, len(seeds))}\n"
            )
    _plot(by_seed, os.path.join(out, "comparison.png"))
    result = {
        "seeds": seeds,
        "reference": reference,
        "rows": rows,
        "spread": spreads,
        "per_seed": per_seed,
        "primer_step_ratio": step_ratio["mean"],
        "primer_step_ratio_spread": step_ratio,
        "primer_time_ratio": time_ratio["mean"],
        "primer_time_ratio_spread": time_ratio,
        "primer_train_time_ratio": train_time_ratio["mean"],
        "primer_train_time_ratio_spread": train_time_ratio,
    }
    write_json(os.path.join(out, "comparison.json"), result)
    return result


def _positive(value) -> bool:
    """A finite number above 0 (a run resumed after its end timed no step: NaN)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def _legend(reference: str | None) -> str:
    if reference is None:
        return f"\nNo reference run ({', '.join(REFERENCES)}): no time-to-target columns.\n"
    name = REFERENCES[reference]
    return (
        f"\nTarget: the final validation loss of {name} (`{reference}`) of the same seed. "
        "steps_to_target / seconds_to_target: where a model's validation curve first "
        "reaches it (interpolated between evaluations; empty: never); step_ratio / "
        f"time_ratio: those as fractions of {name}'s steps / wall-clock seconds "
        "(compilation and evaluation included); train_time_ratio: the step ratio times "
        f"{name}'s training tokens/s over the model's (training steps alone).\n"
    )


def _describe(stats: dict, seeds: int) -> str:
    """`mean ± std [min, max]`, and how many seeds did not count."""
    if stats["mean"] is None:
        return "not reached"
    text = f"{stats['mean']}"
    if stats["std"] is not None:
        text += f" ± {stats['std']} [{stats['min']}, {stats['max']}]"
    if stats["n"] < seeds:
        text += f" (n={stats['n']} of {seeds})"
    return text


def _write_csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        if rows:
            fields = list(dict.fromkeys(k for row in rows for k in row))
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)


def _markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    for row in rows:
        lines.append("| " + " | ".join("" if v is None else str(v) for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


def _plot(by_seed: dict, path: str) -> None:
    """Validation loss vs steps and vs seconds; `by_seed` is `{seed: {model:
    summary}}` (seed None: a one-seed comparison). One colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colours = {}
    for summaries in by_seed.values():
        for model, s in summaries.items():
            rows = [r for r in s["history"] if "val_loss" in r]
            first = model not in colours
            colour = colours.setdefault(model, f"C{len(colours)}")
            style = dict(color=colour, label=model if first else None, alpha=0.8)
            losses = [r["val_loss"] for r in rows]
            by_step.plot([r["step"] for r in rows], losses, "o-", **style)
            by_time.plot([r["wall_time"] for r in rows], losses, "o-", **style)
    for ax in (by_step, by_time):
        for summaries in by_seed.values():
            reference = reference_model(list(summaries))
            if reference is not None:
                ax.axhline(
                    summaries[reference]["val_loss"], color="gray", linestyle=":", linewidth=1
                )
        ax.grid(alpha=0.3)
        ax.legend()
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall-clock seconds")
    by_step.set_ylabel("validation loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
