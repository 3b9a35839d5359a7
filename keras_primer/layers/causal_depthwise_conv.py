"""Causal depthwise convolution along the sequence axis of per-head tensors.

Three formulations compute the same numbers, and the fastest one for the
runtime is chosen when a function is traced (see `conv_formulation`):

- `"shifted"`: a sum of `kernel_size` shifted, scaled copies of the input,
  which XLA fuses into one pass, differentiated by the backend.
- `"shifted_grad"`: the same sum with a hand-written gradient (the input's
  gradient is the same sum run backwards, each tap's gradient one product
  and reduction). PyTorch's form, chosen there (eagerly), writes each shifted product
  in place (`addcmul_`) in both passes, with no shifted or padded copies.
  The `keras.ops` form (JAX, TensorFlow) measured no faster than XLA's own
  derivative of `"shifted"`, so it is not chosen by default there.
- `"depthwise_op"`: the backend's depthwise convolution kernel
  (`keras.ops.depthwise_conv`: `tf.nn.depthwise_conv2d` on TensorFlow, a
  grouped convolution on PyTorch) over `[batch, time, channels]`.
  TensorFlow without XLA, what `model.fit` runs on a CPU-only machine,
  executes the shifted sum as separate slice, pad and multiply kernels
  forward and backward, about 10x slower; under XLA on CPU the depthwise op
  is the slow one. Both are plain ops that TF Serving and ONNX Runtime run.
"""

import math

import keras
from keras import ops

from keras_primer.utils.tracing import in_tensorflow_xla_context

if keras.backend.backend() == "torch":
    import torch

FORMULATIONS = ("shifted", "shifted_grad", "depthwise_op")


def conv_formulation() -> str:
    """The faster formulation for the code being traced now.

    XLA (JAX; TensorFlow under `jit_compile=True`) fuses the shifted sum;
    TensorFlow's graph runtime (and so every export) runs the depthwise op
    faster; eager PyTorch runs the in-place shifted sum with its
    hand-written gradient faster than its grouped convolution (fwd+bwd of
    one MDHA layer at the benchmark size on a loaded 2-core CPU: the
    convolution's share cost 30-50% less than with `groups=channels`).
    Under `torch.compile` the compiler fuses the plain shifted sum, and its
    CUDA backend (Inductor, torch 2.11) failed on the in-place form's
    writes into row slices ("AssertionError: 4096 v.s. 4080").
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return "shifted" if in_tensorflow_xla_context() else "depthwise_op"
    if backend == "torch":
        return "shifted" if torch.compiler.is_compiling() else "shifted_grad"
    return "shifted"


def _shifted_sum(inputs, padded, kernel, zero_history):
    """`sum_s kernel[-1 - s] * (inputs shifted down by s rows)`.

    With a zero history and a static length, each shifted copy is zeros
    concatenated with the head of `inputs`, which XLA fuses better than
    slices of a padded copy (about 25% less time forward and backward).
    """
    newest = kernel.shape[0] - 1
    length = inputs.shape[1]
    outputs = inputs * kernel[newest]
    for shift in range(1, newest + 1):
        if zero_history and length is not None and length > shift:
            previous = ops.concatenate(
                [ops.zeros_like(inputs[:, :shift]), inputs[:, : length - shift]], axis=1
            )
        else:
            start = newest - shift
            previous = padded[:, start : start + ops.shape(inputs)[1]]
        outputs = outputs + previous * kernel[newest - shift]
    return outputs


def _sum_to_kernel_shape(products, kernel_shape):
    """Sums `[batch, time, *channels]` products to one tap of `kernel_shape`
    (`[*kernel_channels]`, broadcastable to the channels), in float32."""
    if keras.backend.standardize_dtype(products.dtype) != "float32":
        products = ops.cast(products, "float32")
    taps = ops.sum(products, axis=(0, 1))
    extra = len(taps.shape) - len(kernel_shape)
    if extra > 0:
        taps = ops.sum(taps, axis=tuple(range(extra)))
    broadcast = tuple(i for i, n in enumerate(kernel_shape) if n == 1 and taps.shape[i] != 1)
    if broadcast:
        taps = ops.sum(taps, axis=broadcast, keepdims=True)
    return taps


def _shift_down(inputs, shift, length):
    """`inputs` moved `shift` rows later in time, zeros entering at the top."""
    return ops.concatenate([ops.zeros_like(inputs[:, :shift]), inputs[:, : length - shift]], axis=1)


def _shift_up(inputs, shift, length):
    """`inputs` moved `shift` rows earlier in time, zeros entering at the bottom."""
    return ops.concatenate([inputs[:, shift:], ops.zeros_like(inputs[:, :shift])], axis=1)


def _shifted_grad_zero_history(inputs, kernel):
    """The shifted sum over a zero history, with a hand-written gradient.

    Forward and backward are each one sum of shifted copies that XLA fuses
    into one pass; each tap's gradient is one product and reduction.
    """
    newest = kernel.shape[0] - 1
    length = inputs.shape[1]
    kernel_shape = tuple(kernel.shape[1:])

    @ops.custom_gradient
    def conv(x, taps):
        outputs = x * taps[newest]
        for shift in range(1, min(newest, length - 1) + 1):
            outputs = outputs + _shift_down(x, shift, length) * taps[newest - shift]

        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            x_grad = upstream * taps[newest]
            tap_grads = [None] * (newest + 1)
            tap_grads[newest] = _sum_to_kernel_shape(upstream * x, kernel_shape)
            for shift in range(1, newest + 1):
                if shift >= length:  # this tap only ever saw the zero history
                    tap_grads[newest - shift] = ops.zeros(kernel_shape, "float32")
                    continue
                x_grad = x_grad + _shift_up(upstream, shift, length) * taps[newest - shift]
                tap_grads[newest - shift] = _sum_to_kernel_shape(
                    upstream * _shift_down(x, shift, length), kernel_shape
                )
            return x_grad, ops.cast(ops.stack(tap_grads, axis=0), taps.dtype)

        return outputs, grad

    return conv(inputs, kernel)


def _shifted_grad_padded(padded, kernel, length):
    """The shifted sum over `padded` (history rows first), hand-written gradient."""
    history = kernel.shape[0] - 1
    kernel_shape = tuple(kernel.shape[1:])
    rest = [[0, 0]] * (len(padded.shape) - 2)

    @ops.custom_gradient
    def conv(rows, taps):
        outputs = rows[:, history : history + length] * taps[history]
        for tap in range(history):
            outputs = outputs + rows[:, tap : tap + length] * taps[tap]

        def grad(*args, upstream=None):
            upstream = args[0] if upstream is None else upstream
            rows_grad = 0
            tap_grads = []
            for tap in range(history + 1):
                spread = [[0, 0], [tap, history - tap]] + rest
                rows_grad = rows_grad + ops.pad(upstream * taps[tap], spread)
                products = upstream * rows[:, tap : tap + length]
                tap_grads.append(_sum_to_kernel_shape(products, kernel_shape))
            return rows_grad, ops.cast(ops.stack(tap_grads, axis=0), taps.dtype)

        return outputs, grad

    return conv(padded, kernel)


if keras.backend.backend() == "torch":

    class _TorchShiftedConv(torch.autograd.Function):
        """The shifted sum with both passes written in place: each tap is one
        `addcmul_` into the output (forward) or into the input's gradient
        (backward), with no shifted or padded copies.

        `rows` is `[batch, history + time, ...]` (history rows first) or,
        with `zero_history`, the inputs alone.
        """

        @staticmethod
        def forward(ctx, rows, kernel, zero_history):
            newest = kernel.shape[0] - 1
            history = 0 if zero_history else newest
            length = rows.shape[1] - history
            outputs = rows[:, history:] * kernel[newest]
            for shift in range(1, min(newest, length - 1 + history) + 1):
                start = history - shift  # first row of `rows` this tap reads
                begin = max(-start, 0)  # outputs before it see the zero history
                outputs[:, begin:].addcmul_(
                    rows[:, start + begin : start + length], kernel[newest - shift]
                )
            ctx.save_for_backward(rows, kernel)
            ctx.history = history
            return outputs

        @staticmethod
        def backward(ctx, upstream):
            rows, kernel = ctx.saved_tensors
            newest, history = kernel.shape[0] - 1, ctx.history
            length = rows.shape[1] - history
            rows_grad = kernel_grad = None
            if ctx.needs_input_grad[0]:
                rows_grad = torch.zeros_like(rows)
                rows_grad[:, history:].add_(upstream * kernel[newest])
            tap_grads = [None] * (newest + 1)
            kernel_shape = tuple(kernel.shape[1:])
            for shift in range(newest + 1):
                start = history - shift
                begin = max(-start, 0)
                if begin >= length:  # this tap only ever saw the zero history
                    tap_grads[newest - shift] = torch.zeros(
                        kernel_shape, dtype=torch.float32, device=kernel.device
                    )
                    continue
                read = rows[:, start + begin : start + length]
                if shift and ctx.needs_input_grad[0]:
                    rows_grad[:, start + begin : start + length].addcmul_(
                        upstream[:, begin:], kernel[newest - shift]
                    )
                tap_grads[newest - shift] = _sum_to_kernel_shape(
                    upstream[:, begin:] * read, kernel_shape
                )
            if ctx.needs_input_grad[1]:
                kernel_grad = torch.stack(tap_grads, dim=0).to(kernel.dtype)
            return rows_grad, kernel_grad, None


def _shifted_grad(inputs, padded, kernel, zero_history):
    """The `"shifted_grad"` formulation (see the module docstring)."""
    if keras.backend.backend() == "torch":
        if zero_history:
            return _TorchShiftedConv.apply(inputs, kernel, True)
        return _TorchShiftedConv.apply(padded, kernel, False)
    length = inputs.shape[1]
    if zero_history and length is not None:
        return _shifted_grad_zero_history(inputs, kernel)
    return _shifted_grad_padded(padded, kernel, ops.shape(inputs)[1])


def _depthwise_op(padded, kernel, length):
    """The same sum through the backend's depthwise convolution ("valid")."""
    channel_shape = list(padded.shape[2:])
    kernel = ops.broadcast_to(kernel, [kernel.shape[0]] + channel_shape)
    channels = math.prod(channel_shape)
    flat = ops.reshape(padded, [ops.shape(padded)[0], ops.shape(padded)[1], channels])
    flat_kernel = ops.reshape(kernel, [kernel.shape[0], channels, 1])
    outputs = ops.depthwise_conv(flat, flat_kernel, strides=1, padding="valid")
    return ops.reshape(outputs, [ops.shape(padded)[0], length] + channel_shape)


def _after_zero_history(inputs, history):
    """`inputs` after `history` rows of zeros along axis 1.

    Not `ops.pad`: it builds a named Keras `Operation` at every call, and
    under `torch.compile` that global name counter is a guard that fails at
    every call, so Dynamo compiled the attention layer again at each step
    until its recompile limit and then ran it eagerly.
    """
    shape = ops.shape(inputs)
    zeros = ops.zeros((shape[0], history, *shape[2:]), dtype=inputs.dtype)
    return ops.concatenate([zeros, inputs], axis=1)


def causal_depthwise_conv(
    inputs, kernel, bias=None, state=None, state_index=None, formulation=None
):
    """Causal depthwise convolution along axis 1 of `[batch, time, ...]`.

    Args:
        inputs: `[batch, time, *channels]`.
        kernel: `[kernel_size, *channels]` (or broadcastable), oldest tap first.
        bias: Optional, broadcastable to `channels`.
        state: Optional `[batch, kernel_size - 1, *channels]`: the inputs just
            before `inputs[:, 0]` (zeros when None).
        state_index: Optional int (tensor), relative to `inputs[:, 0]`: the
            returned state holds the rows just before it (default: `time`).
        formulation: One of `FORMULATIONS` (same numbers up to float
            rounding); None picks the faster one (`conv_formulation`).

    Returns:
        `(outputs, next_state)`; `next_state` is None when `kernel_size == 1`.
    """
    inputs = ops.convert_to_tensor(inputs)
    kernel_size = kernel.shape[0]
    history = kernel_size - 1
    length = ops.shape(inputs)[1]
    kernel = ops.cast(kernel, inputs.dtype)
    if history == 0:
        padded = inputs
    elif state is None:
        padded = _after_zero_history(inputs, history)
    else:
        padded = ops.concatenate([ops.cast(state, inputs.dtype), inputs], axis=1)
    formulation = formulation or conv_formulation()
    if formulation not in FORMULATIONS:
        raise ValueError(f"`formulation` must be one of {FORMULATIONS}. Received: {formulation!r}")
    if history == 0 or formulation == "shifted":
        outputs = _shifted_sum(inputs, padded, kernel, zero_history=state is None)
    elif formulation == "shifted_grad":
        outputs = _shifted_grad(inputs, padded, kernel, zero_history=state is None)
    else:
        outputs = _depthwise_op(padded, kernel, length)
    if bias is not None:
        outputs = outputs + ops.cast(bias, inputs.dtype)
    if history == 0:
        return outputs, None
    if state_index is None:
        return outputs, padded[:, -history:]
    rows = ops.arange(history, dtype="int32") + ops.cast(state_index, "int32")
    return outputs, ops.take(padded, rows, axis=1)


@keras.saving.register_keras_serializable(package="keras_primer")
class CausalSmoothingInitializer(keras.initializers.Initializer):
    """Initial depthwise taps: `current` on the newest tap, the rest on the past.

    The Primer code from Google starts every channel as a causal smoother
    (0.5 on the current position, 0.5 / 3 on each of the two previous ones
    for width 3) rather than as the identity. Taps are laid out oldest first,
    so the last entry along axis 0 multiplies the current position.
    """

    def __init__(self, current: float = 0.5, past_total: float = 1.0 / 3.0):
        self.current = current
        self.past_total = past_total

    def __call__(self, shape, dtype=None):
        kernel_size = shape[0]
        past = self.past_total / max(kernel_size - 1, 1)
        taps = [past] * (kernel_size - 1) + [self.current]
        taps = ops.convert_to_tensor(taps, dtype=dtype or "float32")
        taps = ops.reshape(taps, [kernel_size] + [1] * (len(shape) - 1))
        return taps * ops.ones(shape, dtype=taps.dtype)  # a real tensor, not a broadcast view

    def get_config(self):
        return {"current": self.current, "past_total": self.past_total}


@keras.saving.register_keras_serializable(package="keras_primer")
class CausalDepthwiseConv(keras.layers.Layer):
    """Causal depthwise 1-D convolution over `[batch, time, heads, head_dim]`.

    Output at position `t` mixes inputs at `t - kernel_size + 1 .. t` with one
    kernel per (head, channel), or, with `share_across_heads=True`, one kernel
    per channel shared by every head (the layout of the labml-nn reference).
    Positions before the start are zero, or come from `state` when decoding
    incrementally: `state` holds the `kernel_size - 1` inputs that precede
    `inputs`, and the call returns the rows that precede the next position.

    Kernel taps are stored oldest first (`kernel[-1]` multiplies position
    `t`), the order of PyTorch's `Conv1d` cross-correlation, so the identity
    kernel is `(0, ..., 0, 1)`.

    Args:
        kernel_size: Number of taps, 1 or more.
        share_across_heads: Share the per-channel kernels across heads.
        use_bias: Add a learned per-channel bias after the convolution.
        kernel_initializer: Initializer of the taps; defaults to the causal
            smoother of the Primer code.
        bias_initializer: Initializer of the bias.

    Example:

    >>> import numpy as np
    >>> conv = CausalDepthwiseConv(kernel_size=3)
    >>> x = np.arange(1, 6, dtype="float32").reshape(1, 5, 1, 1)
    >>> conv.build(x.shape)
    >>> _ = conv.kernel.assign(np.array([100.0, 10.0, 1.0]).reshape(3, 1, 1))
    >>> np.asarray(conv(x)).ravel()
    array([  1.,  12., 123., 234., 345.], dtype=float32)
    """

    def __init__(
        self,
        kernel_size: int = 3,
        share_across_heads: bool = False,
        use_bias: bool = False,
        kernel_initializer="causal_smoothing",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        if int(kernel_size) < 1:
            raise ValueError(f"`kernel_size` must be at least 1. Received: {kernel_size}")
        self.kernel_size = int(kernel_size)
        self.share_across_heads = share_across_heads
        self.use_bias = use_bias
        if kernel_initializer == "causal_smoothing":
            kernel_initializer = CausalSmoothingInitializer()
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                "`CausalDepthwiseConv` expects inputs of shape "
                f"[batch, time, heads, head_dim]. Received: {input_shape}"
            )
        num_heads, head_dim = input_shape[2], input_shape[3]
        channel_shape = [head_dim] if self.share_across_heads else [num_heads, head_dim]
        self.kernel = self.add_weight(
            name="kernel",
            shape=[self.kernel_size] + channel_shape,
            initializer=self.kernel_initializer,
        )
        self.bias = None
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias", shape=channel_shape, initializer=self.bias_initializer
            )

    @property
    def state_length(self) -> int:
        """Rows of history a decoding step needs: `kernel_size - 1`."""
        return self.kernel_size - 1

    def call(self, inputs, state=None, state_index=None):
        """Convolves `inputs`; with `state`, also returns the next state.

        Args:
            inputs: `[batch, time, heads, head_dim]`. Rows that must not leak
                into later positions (padding) should already be zero.
            state: Optional `[batch, kernel_size - 1, heads, head_dim]`, the
                inputs at the positions just before `inputs[:, 0]`.
            state_index: Optional int tensor, relative to the first position of
                `inputs`: the returned state holds the rows just before that
                position. Defaults to `time` (the rows after the last input).

        Returns:
            The convolved tensor, or `(convolved, next_state)` when `state` is
            given.
        """
        outputs, next_state = causal_depthwise_conv(
            inputs, self.channel_kernel(), self.channel_bias(), state, state_index
        )
        if state is None:
            return outputs
        return outputs, state if next_state is None else next_state

    def channel_kernel(self):
        """The taps as `[kernel_size, heads or 1, head_dim]`."""
        if self.share_across_heads:
            return ops.expand_dims(self.kernel, axis=1)
        return self.kernel

    def channel_bias(self):
        """The bias as `[heads or 1, head_dim]`, or None."""
        if self.bias is None or not self.share_across_heads:
            return self.bias
        return ops.expand_dims(self.bias, axis=0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "kernel_size": self.kernel_size,
                "share_across_heads": self.share_across_heads,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            }
        )
        return config
