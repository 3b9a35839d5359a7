"""AdamW with linear warmup, cosine decay and gradient clipping."""

from __future__ import annotations

import keras


def learning_rate_schedule(
    peak: float, minimum: float, warmup_steps: int, total_steps: int
) -> keras.optimizers.schedules.CosineDecay:
    """Linear warmup to `peak` over `warmup_steps`, then cosine decay to
    `minimum` at `total_steps`, constant after (Keras' own `CosineDecay`).

    >>> schedule = learning_rate_schedule(1.0, 0.1, warmup_steps=4, total_steps=14)
    >>> [round(float(schedule(s)), 4) for s in (0, 4, 9, 14, 20)]
    [0.25, 1.0, 0.55, 0.1, 0.1]
    """
    if warmup_steps < 0 or total_steps <= warmup_steps:
        raise ValueError(
            f"Need 0 <= warmup_steps < total_steps. Received: warmup_steps={warmup_steps}, "
            f"total_steps={total_steps}."
        )
    warmup = (
        # Warm up from peak / warmup_steps, so the first step already learns.
        dict(
            initial_learning_rate=peak / warmup_steps, warmup_target=peak, warmup_steps=warmup_steps
        )
        if warmup_steps
        else dict(initial_learning_rate=peak)
    )
    return keras.optimizers.schedules.CosineDecay(
        decay_steps=total_steps - warmup_steps, alpha=minimum / peak, **warmup
    )


@keras.saving.register_keras_serializable(package="keras_primer")
class AdamW(keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` whose gradient clipping sees the whole batch.

    Under `tf.distribute` (TensorFlow backend), Keras clips each replica's
    gradient before the replicas' gradients are summed, so a clipped run
    would change with the number of devices. Here the norms are those of
    the summed gradient (one all-reduce), and each replica scales its own
    gradient by the factor `clip / max(norm, clip)` that one device would
    apply, so the sum Keras takes next equals the one-device update.
    Embedding gradients (`tf.IndexedSlices`) keep their sparse form, whose
    norm TensorFlow takes over the slices, as on one device.
    """

    def _clip_gradients(self, grads):
        clip = self.clipnorm or self.global_clipnorm
        if keras.backend.backend() != "tensorflow" or not clip:
            return super()._clip_gradients(grads)
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return super()._clip_gradients(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        # Squared norm of each summed gradient: dense ones need the summed
        # tensor, sparse ones only the sum of squared slice values.
        local = [
            tf.reduce_sum(tf.square(grads[i].values))
            if isinstance(grads[i], tf.IndexedSlices)
            else grads[i]
            for i in present
        ]
        summed = context.all_reduce(tf.distribute.ReduceOp.SUM, local)
        squares = [
            s if isinstance(grads[i], tf.IndexedSlices) else tf.reduce_sum(tf.square(s))
            for i, s in zip(present, summed)
        ]
        if self.clipnorm:
            factors = [clip / tf.maximum(tf.sqrt(s), clip) for s in squares]
        else:
            total = tf.sqrt(tf.add_n(squares))
            factors = [clip / tf.maximum(total, clip)] * len(squares)
        grads = list(grads)
        for i, factor in zip(present, factors):
            g = grads[i]
            if isinstance(g, tf.IndexedSlices):
                grads[i] = tf.IndexedSlices(g.values * factor, g.indices, g.dense_shape)
            else:
                grads[i] = g * tf.cast(factor, g.dtype)
        return grads


def build_optimizer(preset, total_steps: int | None = None) -> keras.optimizers.AdamW:
    """AdamW from a `TrainPreset`: schedule, betas, weight decay, `clipnorm`.

    Weight decay skips biases, layer norms, embeddings and convolution
    kernels of the attention (names containing those words).
    """
    total_steps = total_steps or preset.steps
    schedule = learning_rate_schedule(
        preset.learning_rate,
        preset.min_learning_rate,
        min(preset.warmup_steps, max(total_steps - 1, 0)),
        total_steps,
    )
    optimizer = AdamW(
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
