"""The Feedback stack's time loop and its memory-light custom gradients.

`FeedbackStack` (`feedback_stack.py`) holds the layers and computes one step;
this module runs the steps in order (`run_steps`) and, for training on JAX
and TensorFlow, gives the loop a custom gradient (`run_recomputing_backward`).

Training memory: instead of labml's custom autograd
`Stack`, the gradient of the whole loop is custom: the backward pass walks
the steps in reverse and recomputes each from the final key/value buffers
(`run_recomputing_backward`), so no per-step buffer copies are kept;
`stack.recompute_backward = False` differentiates the loop as written
(PyTorch always does, and so do the convolution variants below). On
TensorFlow without XLA (`model.fit` on a CPU), training, `evaluate` and
`predict` run the forward and the backward loop as XLA-compiled functions
inside the graph (`compiled_time_loop`); exported graphs keep plain ops.
"""

import contextlib

import keras
from keras import ops
from keras.src import backend as keras_backend  # AutocastScope: not in the public API

from keras_primer.layers.cache_utils import (
    export_safe_cache_writes_active,
    fixed_cache_writes,
    grow_rows,
    growing_cache_writes_active,
    write_rows,
)
from keras_primer.utils.tracing import TraceFlag, in_tensorflow_xla_context


def bounded_fori_loop(num_steps, body, state, max_steps):
    """`keras.ops.fori_loop(0, num_steps, body, state)`, with the loop's bound
    (`max_steps`, the buffer length) told to TensorFlow: XLA (`jit_compile=True`)
    cannot differentiate a `while_loop` without `maximum_iterations`, and Keras'
    TensorFlow trainer traces with a dynamic sequence length."""
    if keras.backend.backend() != "tensorflow":
        return ops.fori_loop(0, num_steps, body, state)
    import tensorflow as tf

    return tf.while_loop(
        lambda i, _: i < num_steps,
        lambda i, s: (i + 1, body(i, s)),
        (tf.constant(0), state),
        maximum_iterations=max_steps,
    )[1]


_compiled_loop = TraceFlag()


def compiled_time_loop():
    """Runs cache-less time loops XLA-compiled on TensorFlow, training or not.

    Training (`training=True`) always does outside XLA; calls with
    training=False keep the plain loop unless traced inside this block, so a
    graph someone exports (Keras' own `model.export`) holds no XLA-compiled
    function. `FeedbackCausalLM`'s test and predict steps (`evaluate`,
    `predict`) enter it. Read while tracing; nests; thread-local.
    """
    return _compiled_loop.on()


def dropout_masks(stack, batch_size, length, training):
    """Each step's keep masks of both residual branches of every layer,
    `[length, batch, num_layers, 2, hidden_dim]`, drawn before the loop (so
    that it compiles on every backend); None without dropout."""
    if not training or not stack.dropout:
        return None
    shape = (length, batch_size, stack.num_layers, 2, stack.hidden_dim)
    keep = ops.greater_equal(keras.random.uniform(shape, seed=stack.seed_generator), stack.dropout)
    return ops.cast(keep, stack.compute_dtype) / (1.0 - stack.dropout)


def run_steps(
    stack,
    inputs,
    cache,
    start,
    num_steps,
    padding_mask=None,
    training=None,
    force_loop=False,
):
    """Runs `num_steps` steps of `stack` from `start`, one `_step` each; returns
    `(outputs, cache)`. A single step (decoding) runs without a loop, so the
    exported step graph is plain ops; `force_loop` loops even then (prefill)."""
    cache = {name: cache[name] for name in stack.cache_layout()}
    key_mask = None
    if padding_mask is not None:
        key_mask = ops.cast(padding_mask, "bool")
    batch_size = ops.shape(inputs)[0]
    drop_masks = None
    if not force_loop:
        drop_masks = dropout_masks(stack, batch_size, num_steps, training)
    start = ops.cast(start, "int32")

    if not force_loop and isinstance(num_steps, int) and num_steps == 1:
        # The decoding step: no loop, so the exported graph is plain ops.
        masks = None if drop_masks is None else drop_masks[0]
        out, _, cache = stack._step(inputs[:, 0], start, cache, key_mask, masks, training)
        return out[:, None], cache

    growing = growing_cache_writes_active()
    if growing:
        # The exported step's past holds the steps before `start`: grow the
        # key/value buffers once by this call's steps, then loop over
        # fixed-shape buffers (a loop cannot carry a growing tensor).
        for name in ("key", "value"):
            cache[name] = grow_rows(cache[name], num_steps)

    def body(i, state):
        cache, outputs = state
        x = ops.take(inputs, i, axis=1)
        masks = None if drop_masks is None else ops.take(drop_masks, i, axis=0)
        out, _, cache = stack._step(x, start + i, cache, key_mask, masks, training)
        return cache, write_rows(outputs, out[:, None], i)

    with fixed_cache_writes() if growing else contextlib.nullcontext():
        cache, outputs = bounded_fori_loop(
            num_steps,
            body,
            (cache, ops.zeros_like(inputs)),
            max_steps=ops.shape(cache["key"])[1],
        )
    return outputs, cache


def recomputes_backward(stack) -> bool:
    """Whether a cache-less call takes `run_recomputing_backward`: on JAX
    and TensorFlow, without convolution states (their rows are not in the
    key/value buffers), unless `recompute_backward` is switched off or an
    exporter is tracing (the exported graphs stay plain ops)."""
    return (
        stack.recompute_backward
        and keras.backend.backend() in ("jax", "tensorflow")
        and not stack.conv_state_length
        and not export_safe_cache_writes_active()
    )


def _rows_with_values(stack, variables, values, x, position, keys, vals, key_mask, masks):
    """`_step_rows` as a function of the trainable variables' values.

    `variables` ends with the frozen ones (a LoRA base kernel, say),
    whose values are read outside the differentiated function. The
    backward pass runs after `__call__` has returned, so the autocast of
    mixed precision (the stack's compute dtype) is entered here too, and
    only then: an `AutocastScope(None)` makes every variable report
    float32.
    """
    mapping = list(zip(variables, values))
    mixed = stack.compute_dtype != stack.variable_dtype
    with (
        keras.StatelessScope(state_mapping=mapping),
        keras_backend.AutocastScope(stack.compute_dtype) if mixed else contextlib.nullcontext(),
    ):
        out, _, new_keys, new_values, _ = stack._step_rows(
            x, position, {"key": keys, "value": vals}, key_mask, masks
        )
    return out, new_keys, new_values


def _forward_loop(stack, variables, values, inputs, key_mask, drop_masks, length):
    """The training loop (no cache given) on explicit variable values;
    returns `(outputs, keys, values)` with the final buffers."""
    batch_size = ops.shape(inputs)[0]
    cache = stack.empty_cache(batch_size, length)

    def body(i, state):
        keys, vals, outputs = state
        x = ops.take(inputs, i, axis=1)
        masks = None if drop_masks is None else ops.take(drop_masks, i, axis=0)
        out, new_keys, new_values = _rows_with_values(
            stack, variables, values, x, i, keys, vals, key_mask, masks
        )
        return (
            write_rows(keys, new_keys[:, None], i),
            write_rows(vals, new_values[:, None], i),
            write_rows(outputs, out[:, None], i),
        )

    keys, vals, outputs = bounded_fori_loop(
        length, body, (cache["key"], cache["value"], ops.zeros_like(inputs)), length
    )
    return outputs, keys, vals


def run_recomputing_backward(stack, inputs, key_mask, drop_masks, training=None):
    """The cache-less time loop whose gradient keeps no per-step copies.

    Differentiating the loop as written would keep, for every step, the
    key/value buffers it read (memory quadratic in the length). Step `t`
    reads only buffer rows `< t`, each written once by its own step, so
    the final buffers hold everything every step read. The backward pass
    therefore walks the steps in reverse and recomputes each one from the
    final buffers: its vector-Jacobian product gives the gradients of the
    step's input, of the variables, and of the buffer rows it read, which
    accumulate into one gradient buffer; when the walk reaches step `s`,
    row `s` of that buffer holds the total gradient of the keys/values
    step `s` wrote (every reader of the row ran later). Memory: the
    inputs, the final buffers and one step's activations, linear in the
    length; compute: one extra forward pass of the loop. Equal to
    differentiating the loop directly up to float rounding (tested).
    """
    # Each variable's own flag: keras-hub's `enable_lora` freezes the stack
    # (its `trainable_variables` is then empty) and unfreezes sublayers.
    trainable = [v for v in stack.variables if v.trainable]
    frozen = [v for v in stack.variables if not v.trainable]
    variables = trainable + frozen  # every variable mapped, only the first ones differentiated
    values = [v.value for v in trainable]
    frozen_values = [v.value for v in frozen]
    inputs = ops.cast(inputs, stack.compute_dtype)  # as `__call__` does (not stateless_call)
    if keras.backend.backend() == "tensorflow":
        requested = bool(training) or _compiled_loop.active
        compile_loops = requested and not in_tensorflow_xla_context()
        return _recompute_tensorflow(
            stack, variables, values, frozen_values, inputs, key_mask, drop_masks, compile_loops
        )
    return _recompute_jax(stack, variables, values, frozen_values, inputs, key_mask, drop_masks)


def _recompute_jax(stack, variables, values, frozen_values, inputs, key_mask, drop_masks):
    import jax
    import jax.numpy as jnp

    inputs = jnp.asarray(inputs)
    length = inputs.shape[1]

    @jax.custom_vjp
    def run(values, inputs, drop_masks):
        return _forward_loop(
            stack, variables, values + frozen_values, inputs, key_mask, drop_masks, length
        )[0]

    def forward(values, inputs, drop_masks):
        outputs, keys, vals = _forward_loop(
            stack, variables, values + frozen_values, inputs, key_mask, drop_masks, length
        )
        return outputs, (values, inputs, drop_masks, keys, vals)

    def backward(residuals, upstream):
        values, inputs, drop_masks, keys, vals = residuals
        inputs = jnp.asarray(inputs)

        def body(j, carry):
            grad_values, grad_inputs, grad_keys, grad_vals = carry
            t = length - 1 - j
            masks = None if drop_masks is None else drop_masks[t]

            def step(values, x, keys, vals):
                return _rows_with_values(
                    stack, variables, values + frozen_values, x, t, keys, vals, key_mask, masks
                )

            rows, vjp = jax.vjp(step, values, inputs[:, t], keys, vals)
            cotangents = (upstream[:, t], grad_keys[:, t], grad_vals[:, t])
            d_values, d_x, d_keys, d_vals = vjp(
                tuple(c.astype(r.dtype) for c, r in zip(cotangents, rows))
            )
            return (
                [a + b for a, b in zip(grad_values, d_values)],
                grad_inputs.at[:, t].set(d_x),
                grad_keys + d_keys,
                grad_vals + d_vals,
            )

        init = (
            [jnp.zeros_like(v) for v in values],
            jnp.zeros_like(inputs),
            jnp.zeros_like(keys),
            jnp.zeros_like(vals),
        )
        grad_values, grad_inputs, _, _ = jax.lax.fori_loop(0, length, body, init)
        grad_masks = None if drop_masks is None else jnp.zeros_like(drop_masks)
        return grad_values, grad_inputs, grad_masks

    run.defvjp(forward, backward)
    return run(values, inputs, drop_masks)


def _recompute_tensorflow(
    stack, variables, values, frozen_values, inputs, key_mask, drop_masks, compile_loops
):
    import tensorflow as tf

    num_trainable = len(values)

    def dense(grad, like):
        if grad is None:
            return tf.zeros_like(like)
        return tf.convert_to_tensor(grad)  # the relative tables' gathers give slices

    def forward(inputs, *all_values):
        length = tf.shape(inputs)[1]
        return _forward_loop(
            stack, variables, list(all_values), inputs, key_mask, drop_masks, length
        )

    def backward(upstream, inputs, keys, vals, *all_values):
        values = list(all_values[:num_trainable])
        frozen_values = list(all_values[num_trainable:])
        length = tf.shape(inputs)[1]

        def body(j, grad_values, grad_inputs, grad_keys, grad_vals):
            t = length - 1 - j
            x = tf.gather(inputs, t, axis=1)
            masks = None if drop_masks is None else tf.gather(drop_masks, t)
            with tf.GradientTape() as tape:
                tape.watch([x, keys, vals] + values)
                out, new_keys, new_values = _rows_with_values(
                    stack, variables, values + frozen_values, x, t, keys, vals, key_mask, masks
                )
            sources = [x, keys, vals] + values
            rows = [out, new_keys, new_values]
            cotangents = [
                tf.gather(upstream, t, axis=1),
                tf.gather(grad_keys, t, axis=1),
                tf.gather(grad_vals, t, axis=1),
            ]
            grads = tape.gradient(
                rows,
                sources,
                output_gradients=[tf.cast(c, r.dtype) for c, r in zip(cotangents, rows)],
            )
            grads = [dense(g, s) for g, s in zip(grads, sources)]
            d_x, d_keys, d_vals = grads[:3]
            return (
                j + 1,
                [a + b for a, b in zip(grad_values, grads[3:])],
                write_rows(grad_inputs, d_x[:, None], t),
                grad_keys + d_keys,
                grad_vals + d_vals,
            )

        _, grad_values, grad_inputs, _, _ = tf.while_loop(
            lambda j, *_: j < length,
            body,
            (
                tf.constant(0),
                [tf.zeros_like(v) for v in values],
                tf.zeros_like(inputs),
                tf.zeros_like(keys),
                tf.zeros_like(vals),
            ),
            maximum_iterations=length,
        )
        return [grad_inputs] + list(grad_values)

    if compile_loops:
        # Outside XLA (`fit`, `evaluate`, `predict` on a CPU): each loop
        # becomes one XLA computation. TensorFlow's graph executor would
        # run the loop bodies op by op, and Grappler rewrites their large
        # gradient sums into temporary variables that collide across
        # iterations (`AlreadyExistsError ... tmp_var`) from about width
        # 256, batch 16.
        forward = tf.function(forward, jit_compile=True, autograph=False)
        backward = tf.function(backward, jit_compile=True, autograph=False)

    # The frozen values are inputs too (without a gradient): a tensor the
    # function captured would make TensorFlow look for variables behind it.
    @tf.custom_gradient
    def run(inputs, *all_values):
        # `grad` is the gradient: a tape must not differentiate the loop
        # (eagerly it would, and the compiled loop cannot hand it its
        # per-step state).
        outputs, keys, vals = forward(*(tf.stop_gradient(a) for a in (inputs, *all_values)))

        def grad(upstream):
            grads = backward(upstream, inputs, keys, vals, *all_values)
            return list(grads) + [None] * len(frozen_values)

        return outputs, grad

    return run(inputs, *values, *frozen_values)
