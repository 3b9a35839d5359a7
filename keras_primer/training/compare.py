"""Primer EZ vs the Transformer baseline (and Feedback) on the same budget and seed.

With several seeds (`seeds=`), each model trains once per seed and the report
gives Primer EZ's step ratio per seed and its mean and spread: one seed's
ratio moves by tens of percent on small runs, so a single number is no claim.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

from keras_primer.training.driver import RunConfig, train
from keras_primer.training.reporting import write_json

BASELINE = "transformer"


def steps_to_reach(history: list[dict], target: float, key: str = "step") -> float | None:
    """`key` (`"step"` or `"wall_time"`) at which `val_loss` first falls to
    `target`, linearly interpolated between evaluations (None if never)."""
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


def run_dir(out: str, model: str, seed: int | None = None) -> str:
    """`<out>/<model>/`, or `<out>/<model>/seed-<seed>/` in a several-seed comparison."""
    path = os.path.join(out, model)
    return path if seed is None else os.path.join(path, f"seed-{seed}")


def check_seeds(seeds) -> tuple[int, ...]:
    """`seeds` as a tuple of distinct integers >= 0.

    Raises:
        ValueError: Empty, not integers, negative or repeated.
    """
    seeds = tuple(seeds)
    if not seeds:
        raise ValueError("--seeds needs at least one seed, e.g. --seeds 0,1,2.")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Seeds must be integers >= 0. Received: {seed!r}.")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"Seeds must be distinct. Received: {list(seeds)}.")
    return seeds


def compare(
    base: RunConfig,
    models: tuple[str, ...] = ("primer_ez", "transformer", "feedback"),
    out: str | None = None,
    seeds: tuple[int, ...] | None = None,
) -> dict:
    """Trains each of `models` with `base`'s settings (same seed, data, budget).

    Writes `<out>/<model>/` (every output of `train`) and the report of
    `report`. With `seeds`, each model trains once per seed (the seed of the
    weights and of the batches) in `<out>/<model>/seed-<s>/` and the report
    is `report_seeds`'. Rerunning resumes unfinished runs (see `train`).

    Returns:
        What `report` (or `report_seeds`) returns.
    """
    out = os.path.abspath(out or base.out)
    os.makedirs(out, exist_ok=True)
    if seeds is None:
        summaries = {}
        for model in models:
            config = dataclasses.replace(base, model=model, out=run_dir(out, model))
            summaries[model] = train(config)
        return report(summaries, out)
    by_seed = {}
    # Seed-major order: an interrupted comparison has whole seeds to report.
    for seed in check_seeds(seeds):
        by_seed[seed] = {}
        for model in models:
            config = dataclasses.replace(
                base, model=model, seed=seed, out=run_dir(out, model, seed)
            )
            by_seed[seed][model] = train(config)
    return report_seeds(by_seed, out)


def load_summaries(out: str, models: tuple[str, ...], seeds: tuple[int, ...] | None = None) -> dict:
    """The `summary.json` of each finished run under `out` (for `report`);
    with `seeds`, `{seed: {model: summary}}` (for `report_seeds`).

    Raises:
        ValueError: A model's run has no summary (it did not finish).
    """
    if seeds is not None:
        return {seed: _load(out, models, seed) for seed in check_seeds(seeds)}
    return _load(out, models, None)


def _load(out: str, models: tuple[str, ...], seed: int | None) -> dict:
    summaries = {}
    for model in models:
        path = os.path.join(run_dir(out, model, seed), "summary.json")
        if not os.path.exists(path):
            which = model if seed is None else f"{model} seed {seed}"
            raise ValueError(f"No finished `{which}` run in {out}: {path} is missing.")
        with open(path) as f:
            summaries[model] = json.load(f)
    return summaries


def report(summaries: dict, out: str) -> dict:
    """Writes `comparison.csv`, `.md`, `.json` and `.png` (validation loss vs
    steps and vs wall-clock seconds) for finished runs.

    Each row has the fraction of the baseline's steps and wall-clock a model
    needs to reach the baseline's final validation loss (`steps_to_baseline`,
    `time_to_baseline`; empty when not reached).

    Returns:
        `{"rows": [...], "primer_step_ratio": float | None}`: the ratio is
        Primer EZ's `steps_to_baseline`.
    """
    rows = comparison_rows(summaries)
    ratio = next((r["steps_to_baseline"] for r in rows if r["model"] == "primer_ez"), None)
    _write_csv(os.path.join(out, "comparison.csv"), rows)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(_markdown_table(rows))
        f.write(
            "\nsteps_to_baseline / time_to_baseline: the fraction of the Transformer's "
            "steps / wall-clock seconds a model needs to reach the Transformer's final "
            "validation loss (empty: not reached). Primer EZ: "
            f"{'not reached' if ratio is None else ratio}\n"
        )
    _plot({None: summaries}, os.path.join(out, "comparison.png"))
    result = {"rows": rows, "primer_step_ratio": ratio}
    write_json(os.path.join(out, "comparison.json"), result)
    return result


def comparison_rows(summaries: dict) -> list[dict]:
    """One row per model of one seed's finished runs (see `report`)."""
    baseline = summaries.get(BASELINE)
    rows = []
    for model, s in summaries.items():
        row = {
            "model": model,
            "parameters": s["parameters"],
            "steps": s["steps"],
            "val_loss": round(s["val_loss"], 4),
            "val_bits_per_char": round(s["val_bits_per_char"], 4),
            "tokens_per_second": round(s["tokens_per_second"], 1),
            "wall_time_s": round(s["wall_time_s"], 1),
            "steps_to_baseline": None,
            "time_to_baseline": None,
        }
        if baseline is not None:
            target = baseline["val_loss"]
            steps = steps_to_reach(s["history"], target)
            seconds = steps_to_reach(s["history"], target, key="wall_time")
            base_seconds = [r["wall_time"] for r in baseline["history"] if "val_loss" in r][-1]
            if steps is not None:
                row["steps_to_baseline"] = round(steps / baseline["steps"], 3)
                row["time_to_baseline"] = round(seconds / base_seconds, 3)
        rows.append(row)
    return rows


# Columns summarised over seeds (each model's mean, std, min and max).
SPREAD_COLUMNS = ("val_loss", "val_bits_per_char", "steps_to_baseline", "time_to_baseline")


def spread(values: list[float | None]) -> dict:
    """Mean, sample standard deviation (n - 1), min and max of the values
    that are not None; `n` counts them and `missing` the Nones (a model that
    never reached the baseline's loss in that seed).

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

    Each seed's ratios are against that seed's baseline (same weights seed,
    same batches). Writes `comparison.csv` (a row per seed and model, then a
    `mean`, `std`, `min` and `max` row per model), `.md`, `.json` and `.png`
    (every seed's curves).

    Returns:
        `{"seeds", "rows", "spread", "per_seed", "primer_step_ratio",
        "primer_step_ratio_spread"}`: `per_seed` maps each seed to Primer EZ's
        `steps_to_baseline` (None: not reached), `primer_step_ratio` is their
        mean over the seeds where it was reached and
        `primer_step_ratio_spread` is `spread` of them.
    """
    seeds = list(by_seed)
    rows = []
    for seed, summaries in by_seed.items():
        rows += [{"seed": seed, **row} for row in comparison_rows(summaries)]
    models = list(dict.fromkeys(row["model"] for row in rows))
    spreads = {
        model: {
            column: spread([r[column] for r in rows if r["model"] == model])
            for column in SPREAD_COLUMNS
        }
        for model in models
    }
    per_seed = {
        seed: next(
            (
                r["steps_to_baseline"]
                for r in rows
                if r["seed"] == seed and r["model"] == "primer_ez"
            ),
            None,
        )
        for seed in seeds
    }
    ratio = spread(list(per_seed.values())) if "primer_ez" in models else spread([])
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
        f.write("\nOver the seeds (std: sample standard deviation; n: seeds counted):\n\n")
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
        f.write(
            "\nsteps_to_baseline / time_to_baseline: the fraction of the Transformer's "
            "steps / wall-clock seconds a model needs to reach the Transformer's final "
            "validation loss of the same seed (empty: not reached).\n\n"
            "Primer EZ step ratio per seed: "
            + ", ".join(
                f"{seed}: {'not reached' if r is None else r}" for seed, r in per_seed.items()
            )
            + f"\nPrimer EZ step ratio: {_describe(ratio, len(seeds))}\n"
        )
    _plot(by_seed, os.path.join(out, "comparison.png"))
    result = {
        "seeds": seeds,
        "rows": rows,
        "spread": spreads,
        "per_seed": per_seed,
        "primer_step_ratio": ratio["mean"],
        "primer_step_ratio_spread": ratio,
    }
    write_json(os.path.join(out, "comparison.json"), result)
    return result


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
            if BASELINE in summaries:
                ax.axhline(
                    summaries[BASELINE]["val_loss"], color="gray", linestyle=":", linewidth=1
                )
        ax.grid(alpha=0.3)
        ax.legend()
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall-clock seconds")
    by_step.set_ylabel("validation loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
