"""AdamW with linear warmup, cosine decay and gradient clipping."""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_primer")
class WarmupCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `peak`, then cosine decay to `minimum` at `decay_steps`.

    Constant `minimum` after `decay_steps`.
    """

    def __init__(self, peak: float, minimum: float, warmup_steps: int, decay_steps: int):
        if warmup_steps < 0 or decay_steps < 1:
            raise ValueError(
                f"Need warmup_steps >= 0 and decay_steps >= 1. Received: "
                f"warmup_steps={warmup_steps}, decay_steps={decay_steps}."
            )
        self.peak = float(peak)
        self.minimum = float(minimum)
        self.warmup_steps = int(warmup_steps)
        self.decay_steps = int(decay_steps)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = self.peak * (step + 1.0) / max(self.warmup_steps, 1)
        span = max(self.decay_steps - self.warmup_steps, 1)
        progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
        cosine = self.minimum + 0.5 * (self.peak - self.minimum) * (
            1.0 + ops.cos(math.pi * progress)
        )
        return ops.where(step < self.warmup_steps, warmup, cosine)

    def get_config(self):
        return {
            "peak": self.peak,
            "minimum": self.minimum,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
        }


def build_optimizer(preset, total_steps: int | None = None) -> keras.optimizers.AdamW:
    """AdamW from a `TrainPreset`: schedule, betas, weight decay, `clipnorm`.

    Weight decay skips biases, layer norms, embeddings and convolution
    kernels of the attention (names containing those words).
    """
    schedule = WarmupCosineDecay(
        preset.learning_rate,
        preset.min_learning_rate,
        min(preset.warmup_steps, max((total_steps or preset.steps) - 1, 0)),
        total_steps or preset.steps,
    )
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule,
        weight_decay=preset.weight_decay,
        beta_1=preset.beta_1,
        beta_2=preset.beta_2,
        clipnorm=preset.clipnorm or None,
    )
    optimizer.exclude_from_weight_decay(
        var_names=["bias", "gamma", "beta", "embedding", "layer_norm", "conv"]
    )
    return optimizer
