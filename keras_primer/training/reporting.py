"""What a run leaves behind: history, learning curve, samples, summary."""

from __future__ import annotations

import csv
import math
import os


def read_history(path: str) -> list[dict]:
    """Rows of a `CSVLogger` file as dicts of floats (empty list if missing)."""
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for key, value in row.items():
                try:
                    parsed[key] = float(value)
                except (TypeError, ValueError):
                    parsed[key] = value
            rows.append(parsed)
    return rows


def plot_learning_curve(history: list[dict], path: str, title: str = "") -> str | None:
    """Training and validation loss vs step, saved as a PNG (None: no rows)."""
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, [row.get("loss", math.nan) for row in history], "o-", label="train loss")
    if any("val_loss" in row for row in history):
        ax.plot(steps, [row.get("val_loss", math.nan) for row in history], "s-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def generate_text(lm, prompt: str, num_tokens: int, window: int | None = None) -> str:
    """`prompt` plus about `num_tokens` generated tokens, beyond the context.

    Generation slides: each call continues the last `window // 2` tokens of
    text with `lm.generate(..., max_length=window)`.
    """
    tokenizer = lm.preprocessor.tokenizer
    window = window or lm.preprocessor.sequence_length
    text = prompt
    produced = 0
    while produced < num_tokens:
        ids = tokenizer(text)
        ids = [int(i) for i in (ids.numpy() if hasattr(ids, "numpy") else ids)]
        keep = ids[-(window // 2) :] if len(ids) > window // 2 else ids
        context = tokenizer.detokenize(keep)
        context = (
            context.numpy().decode("utf-8", "replace") if hasattr(context, "numpy") else context
        )
        from keras_primer.training.distribution import generate

        out = generate(lm, context, max_length=window)
        if not isinstance(out, str):
            out = out.numpy().decode("utf-8", "replace") if hasattr(out, "numpy") else str(out)
        new = out[len(context) :] if out.startswith(context) else out
        if not new:
            break
        text += new
        produced += window - len(keep)
    return text


def write_json(path: str, data: dict) -> None:
    """`data` as indented JSON (NaN written as null), written atomically."""

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    from keras_primer.training.run_dir import write_json_atomic

    write_json_atomic(path, clean(data))
