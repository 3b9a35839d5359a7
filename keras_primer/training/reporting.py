"""What a run leaves behind (stage 11 of `driver.train`): the final
evaluation, `model.keras`, samples, learning curve and `summary.json`."""

from __future__ import annotations

import dataclasses
import math

import keras

from keras_primer.models.base import PERPLEXITY_LOSS_CAP
from keras_primer.training.callbacks import TrainingLog, optimizer_step
from keras_primer.training.fit_loop import Callbacks
from keras_primer.training.run_dir import atomic_write, write_json_atomic
from keras_primer.training.run_model import save_model_atomic
from keras_primer.training.run_setup import Run


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

    write_json_atomic(path, clean(data))


def tokens_per_second(log: TrainingLog, history: list) -> float | None:
    """This call's measured throughput, else the last measured in the run's
    history (a rerun of a finished run trains nothing), else None."""
    if math.isfinite(log.tokens_per_second):
        return log.tokens_per_second
    measured = [
        r["tokens_per_second"]
        for r in history
        if isinstance(r.get("tokens_per_second"), (int, float))
        and math.isfinite(r["tokens_per_second"])
    ]
    return float(measured[-1]) if measured else None


def write_reports(run: Run, lm, dist, callbacks: Callbacks) -> dict:
    """Final evaluation, `model.keras`, samples, learning curve and `summary.json`."""
    config, preset, splits = run.config, run.preset, run.splits
    history = callbacks.recorder.rows
    val_x, val_y = run.val
    final_step = optimizer_step(lm)
    results = keras.Model.evaluate(
        lm,
        val_x,
        val_y,
        batch_size=dist.eval_batch_size(preset.batch_size),
        verbose=0,
        return_dict=True,
    )
    model_path = run.path("model.keras")
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
        with atomic_write(run.path("samples.txt"), "w") as f:
            f.write(text)
    preset_name = config.preset if isinstance(config.preset, str) else "custom"
    curve = None
    if run.outputs["learning_curve"]:
        curve = plot_learning_curve(
            history, run.path("learning_curve.png"), f"{config.model} ({preset_name})"
        )
    val_loss = float(results["loss"])
    losses = [r["val_loss"] for r in history if "val_loss" in r]
    summary = {
        "model": config.model,
        "preset": preset_name,
        "backend": keras.backend.backend(),
        "precision": config.precision,
        "distribution": config.distribution,
        "tokenizer": run.codec.describe(),
        "data": run.corpus.path,
        "parameters": int(lm.backbone.count_params()),
        "steps": final_step,
        "resumed_from_step": run.start,
        "batch_size": preset.batch_size,
        "sequence_length": preset.sequence_length,
        "train_tokens": int(len(splits.train)),
        "val_tokens": int(len(splits.val)),
        "val_loss": val_loss,
        "val_perplexity": math.exp(min(val_loss, PERPLEXITY_LOSS_CAP)),
        "val_bits_per_char": val_loss * splits.val_tokens_per_char / math.log(2.0),
        "best_val_loss": min(losses or [val_loss]),
        "tokens_per_second": tokens_per_second(callbacks.log, history),
        "wall_time_s": run.clock(),
        "history": history,
        "samples": samples,
        "files": {
            "model": model_path,
            "best_model": run.path("best.keras"),
            "history": run.path("history.csv"),
            "learning_curve": curve,
            "tensorboard": run.path("tensorboard") if run.outputs["tensorboard"] else None,
            "checkpoints": run.path("checkpoints"),
        },
        "preset_settings": dataclasses.asdict(preset),
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "preset"},
    }
    write_json(run.path("summary.json"), summary)
    return summary
