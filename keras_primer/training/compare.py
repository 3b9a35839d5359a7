"""Primer EZ vs the Transformer baseline (and Feedback) on the same budget and seed."""

from __future__ import annotations

import csv
import dataclasses
import json
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


def compare(
    base: RunConfig,
    models: tuple[str, ...] = ("primer_ez", "transformer", "feedback"),
    out: str | None = None,
) -> dict:
    """Trains each of `models` with `base`'s settings (same seed, data, budget).

    Writes `<out>/<model>/` (every output of `train`) and the report of
    `report`.

    Returns:
        What `report` returns.
    """
    out = os.path.abspath(out or base.out)
    os.makedirs(out, exist_ok=True)
    summaries = {}
    for model in models:
        config = dataclasses.replace(base, model=model, out=os.path.join(out, model))
        summaries[model] = train(config)
    return report(summaries, out)


def load_summaries(out: str, models: tuple[str, ...]) -> dict:
    """The `summary.json` of each finished run under `out` (for `report`).

    Raises:
        ValueError: A model's run has no summary (it did not finish).
    """
    summaries = {}
    for model in models:
        path = os.path.join(out, model, "summary.json")
        if not os.path.exists(path):
            raise ValueError(f"No finished `{model}` run in {out}: {path} is missing.")
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
    ratio = next((r["steps_to_baseline"] for r in rows if r["model"] == "primer_ez"), None)

    with open(os.path.join(out, "comparison.csv"), "w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        if rows:
            f.write("| " + " | ".join(rows[0]) + " |\n")
            f.write("|" + "---|" * len(rows[0]) + "\n")
            for row in rows:
                f.write(
                    "| " + " | ".join("" if v is None else str(v) for v in row.values()) + " |\n"
                )
        f.write(
            "\nsteps_to_baseline / time_to_baseline: the fraction of the Transformer's "
            "steps / wall-clock seconds a model needs to reach the Transformer's final "
            "validation loss (empty: not reached). Primer EZ: "
            f"{'not reached' if ratio is None else ratio}\n"
        )
    _plot(summaries, os.path.join(out, "comparison.png"))
    result = {"rows": rows, "primer_step_ratio": ratio}
    write_json(os.path.join(out, "comparison.json"), result)
    return result


def _plot(summaries: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for model, s in summaries.items():
        rows = [r for r in s["history"] if "val_loss" in r]
        by_step.plot([r["step"] for r in rows], [r["val_loss"] for r in rows], "o-", label=model)
        by_time.plot(
            [r["wall_time"] for r in rows], [r["val_loss"] for r in rows], "o-", label=model
        )
    baseline = summaries.get(BASELINE)
    for ax in (by_step, by_time):
        if baseline is not None:
            ax.axhline(baseline["val_loss"], color="gray", linestyle=":", linewidth=1)
        ax.grid(alpha=0.3)
        ax.legend()
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall-clock seconds")
    by_step.set_ylabel("validation loss (nats/token)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
