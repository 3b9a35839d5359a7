"""Primer EZ vs the Transformer baseline (and Feedback) on the same budget and seed."""

from __future__ import annotations

import csv
import dataclasses
import os

from keras_primer.training.driver import RunConfig, train
from keras_primer.training.models import feedback_available
from keras_primer.training.reporting import write_json


def steps_to_reach(history: list[dict], target: float) -> float | None:
    """First step whose `val_loss` is at most `target`, linearly interpolated
    between evaluations (None if never reached)."""
    previous = None
    for row in history:
        if "val_loss" not in row:
            continue
        step, loss = row["step"], row["val_loss"]
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            s0, l0 = previous
            return float(s0 + (l0 - target) / (l0 - loss) * (step - s0))
        previous = (step, loss)
    return None


def compare(
    base: RunConfig,
    models: tuple[str, ...] = ("primer_ez", "transformer", "feedback"),
    out: str | None = None,
) -> dict:
    """Trains each of `models` with `base`'s settings (same seed, data, budget).

    Writes `<out>/<model>/` (every output of `train`), `comparison.csv`,
    `comparison.md`, `comparison.json` and `comparison.png` (validation loss
    vs steps and vs wall-clock seconds). `feedback` is skipped, with a note,
    when its module is not available.

    Returns:
        `{"rows": [...], "primer_step_ratio": float | None, "skipped": {...}}`,
        where the ratio is (steps Primer EZ needs to reach the Transformer's
        final validation loss) / (the Transformer's steps).
    """
    out = os.path.abspath(out or base.out)
    os.makedirs(out, exist_ok=True)
    summaries, skipped = {}, {}
    for model in models:
        if model == "feedback" and not feedback_available():
            skipped[model] = "keras_primer.models.feedback is not available"
            continue
        config = dataclasses.replace(base, model=model, out=os.path.join(out, model))
        summaries[model] = train(config)

    rows = []
    for model, s in summaries.items():
        rows.append({
            "model": model,
            "parameters": s["parameters"],
            "steps": s["steps"],
            "val_loss": round(s["val_loss"], 4),
            "val_bits_per_char": round(s["val_bits_per_char"], 4),
            "tokens_per_second": round(s["tokens_per_second"], 1),
            "wall_time_s": round(s["wall_time_s"], 1),
        })
    ratio = None
    if "primer_ez" in summaries and "transformer" in summaries:
        baseline = summaries["transformer"]
        reached = steps_to_reach(summaries["primer_ez"]["history"], baseline["val_loss"])
        if reached is not None:
            ratio = reached / baseline["steps"]
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
                f.write("| " + " | ".join(str(v) for v in row.values()) + " |\n")
        f.write(
            "\nSteps Primer EZ needs to reach the Transformer's final validation loss, "
            f"as a fraction of the Transformer's steps: "
            f"{'not reached' if ratio is None else f'{ratio:.3f}'}\n"
        )
        for model, why in skipped.items():
            f.write(f"\n{model} skipped: {why}\n")
    _plot(summaries, os.path.join(out, "comparison.png"))
    result = {"rows": rows, "primer_step_ratio": ratio, "skipped": skipped}
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
        by_time.plot([r["wall_time"] for r in rows], [r["val_loss"] for r in rows], "o-", label=model)
    by_step.set_xlabel("step")
    by_time.set_xlabel("wall-clock seconds")
    by_step.set_ylabel("validation loss (nats/token)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
