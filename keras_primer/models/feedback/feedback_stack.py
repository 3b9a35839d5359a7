"""Feedback Transformer stack: all layers and the memory, run as one time loop.

The Feedback Transformer (Fan et al. 2020, arXiv 2002.09402) replaces each
layer's view of the previous positions by one shared *memory*: at step `t`
every layer attends to memory slots `m_s` of the steps `s < t`, where
`m_s = sum_l softmax(w)_l h_s^l` mixes all layers' outputs at step `s` (the
embedding `h_s^0` included) with learned weights `w`. The computation is
sequential in time, so `FeedbackStack` runs one `keras.ops.fori_loop` over the
steps with fixed-shape key/value buffers (JAX and TensorFlow compile it into one
loop; PyTorch runs it as a Python loop).

Semantics follow labml-nn's `transformers/feedback` implementation:

* pre-norm layers `x += Attn(LN(x), memory)`, `x += FFN(LN(x))`; at `t = 0`
  there is no memory and the attention sublayer adds nothing;
* the memory mixes the raw residual streams (before the final layer norm) and
  keys/values are projected from the raw memory (no norm on the memory side);
* positions enter only through learned relative terms in the scores:
  `[(q + u) . k_s + q . P[t - s] + S[t - s]] / sqrt(head_dim)`, with `P`
  (per-offset key embeddings), `S` (per-offset biases) and `u` zero-initialised;
* layer-mixing weights start at ones (a uniform mixture).

Differences from labml, all documented options or implementation choices:

* `shared_kv=False` (labml's `FeedbackTransformer`) keeps one key/value
  projection per layer but applies it once per step, when the memory slot is
  formed, and caches the per-layer keys/values (labml re-projects the whole
  memory at every step; the result is the same).
* `memory_window=M` limits attention to the last `M` steps (labml: unlimited;
  Fan et al.: the attention span).
* Relative tables hold `min(max_sequence_length, memory_window)` offsets rather
  than labml's fixed 4096, and any sequence length up to
  `max_sequence_length` works (labml's shared-KV model stops at 512).
* Dropout is applied to the embeddings and to both residual branches; there
  is no dropout on attention probabilities or inside the feed-forward block
  (dropout masks are drawn before the loop so that it compiles on every
  backend).
* Training memory (JAX, TensorFlow): the loop's gradient is custom and keeps
  no per-step buffer copies (`feedback_time_loop`).
* Attending to the current step (not in the paper or labml) is not offered:
  the current slot needs the outputs of all layers of the same step.

`use_dconv=True` adds Primer's MDHA convolutions over time to the queries
and the memory (our extension; `feedback_convolutions`).
"""

import contextlib

import keras
from keras import ops
from keras.src import backend as keras_backend  # AutocastScope: not in the public API

from keras_primer.activations import get_activation, serialize_activation
from keras_primer.layers.cache_utils import write_rows
from keras_primer.layers.causal_depthwise_conv import CausalDepthwiseConv
from keras_primer.layers.feed_forward import FeedForward
from keras_primer.layers.residual import call_sublayer, pre_norm_residual
from keras_primer.models.feedback.feedback_attention import FeedbackAttention
from keras_primer.models.feedback.feedback_convolutions import convolve_memory
from keras_primer.models.feedback.feedback_time_loop import (
    dropout_masks,
    recomputes_backward,
    run_recomputing_backward,
    run_steps,
)


@keras.saving.register_keras_serializable(package="keras_primer")
class FeedbackStack(keras.layers.Layer):
    """All Feedback Transformer layers and the memory, run as one time loop.

    Input: embeddings `[batch, length, hidden_dim]`; output: the top layer's
    residual stream `[batch, length, hidden_dim]` (before the final norm).
    Memory slots are kept as their key/value projections in fixed-shape
    buffers `[batch, length, kv_groups, num_heads, head_dim]`, where
    `kv_groups` is 1 with `shared_kv=True` (the fast variant: one projection
    for all layers, so each step's keys/values are computed once) and
    `num_layers` otherwise (the original: one projection per layer). The same
    per-step code serves training (`cache=None`, empty buffers) and cached
    decoding (`cache`, a dict of `cache_layout()`, see `call`).

    Args:
        num_layers: Number of feedback layers.
        num_heads: Attention heads.
        intermediate_dim: Feed-forward hidden width.
        max_sequence_length: Longest sequence; sizes the relative tables.
        activation: Feed-forward activation (`"squared_relu"` = Primer-style).
        dropout: Dropout on both residual branches.
        shared_kv: One key/value projection shared by all layers.
        memory_window: None (attend to all past steps) or `M` (the last `M`).
        layer_norm_epsilon: Epsilon of the layer norms.
        kernel_initializer: Initializer of the dense kernels.
        seed: Seed of the dropout masks; None draws it from Keras' global
            RNG, so `keras.utils.set_random_seed` (the training `--seed`)
            reaches it.
        use_dconv: Causal depthwise convolutions over time on the queries
            and on the memory's keys and values (see the module docstring).
        kernel_size: Width of those convolutions.

    Sublayers, by name: per layer `attention_norm_i`, `attention_i` (a
    `FeedbackAttention`, whose `query` projection takes LoRA),
    `feed_forward_norm_i`, `feed_forward_i`; shared by all layers the memory
    projections `key` and `value` (`EinsumDense`, `[hidden, kv_groups,
    heads, head_dim]`; `value` takes LoRA and, per layer, a bias) and
    `layer_weights`; with `use_dconv` each attention's `query_conv` and the
    memory's `key_conv`, `value_conv` (`CausalDepthwiseConv`, kernels
    `[kernel_size, kv_groups * num_heads, head_dim]` for the memory).
    `backbone.enable_lora(rank)` thus adapts the query
    of every layer and the value projection of the memory, the shared-KV
    counterpart of LoRA on query and value.

    Mixed precision: every weight is stored in the policy's variable dtype
    (float32 under `mixed_bfloat16`) and used in the compute dtype, except
    `layer_weights`, which is never autocast (float32 under the mixed
    policies): the softmax over layers is taken in float32, then cast once
    to mix the layer outputs. The key/value buffers are in the compute dtype.

    Example:

    >>> import numpy as np
    >>> stack = FeedbackStack(num_layers=2, num_heads=2, intermediate_dim=32,
    ...     max_sequence_length=8)
    >>> tuple(stack(np.random.rand(1, 5, 16).astype("float32")).shape)
    (1, 5, 16)
    """

    def __init__(
        self,
        num_layers: int,
        num_heads: int,
        intermediate_dim: int,
        max_sequence_length: int,
        activation="relu",
        dropout: float = 0.0,
        shared_kv: bool = True,
        memory_window: int | None = None,
        layer_norm_epsilon: float = 1e-5,
        kernel_initializer="glorot_uniform",
        seed: int | None = None,
        use_dconv: bool = False,
        kernel_size: int = 3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if memory_window is not None and int(memory_window) < 1:
            raise ValueError(
                f"`memory_window` must be None or a positive number of steps. "
                f"Received: {memory_window}"
            )
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.max_sequence_length = max_sequence_length
        self.activation = get_activation(activation)
        self.dropout = dropout
        self.shared_kv = shared_kv
        self.memory_window = None if memory_window is None else int(memory_window)
        self.layer_norm_epsilon = layer_norm_epsilon
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        if int(kernel_size) < 1:
            raise ValueError(f"`kernel_size` must be at least 1. Received: {kernel_size}")
        self.use_dconv = bool(use_dconv)
        self.kernel_size = int(kernel_size)
        # Not in the config: a switch for tests and benchmarks (see
        # `feedback_time_loop.run_recomputing_backward`); the forward pass is the same.
        self.recompute_backward = True

    @property
    def kv_groups(self) -> int:
        """Key/value projections per memory slot: 1 (shared) or num_layers."""
        return 1 if self.shared_kv else self.num_layers

    @property
    def conv_state_length(self) -> int:
        """Raw rows of earlier steps each convolution needs (0 without)."""
        return self.kernel_size - 1 if self.use_dconv else 0

    @property
    def max_relative_distance(self) -> int:
        limit = max(int(self.max_sequence_length), 1)
        if self.memory_window is not None:
            limit = min(limit, self.memory_window)
        return limit

    def build(self, input_shape, *args, **kwargs):
        hidden_dim = input_shape[-1]
        if hidden_dim % self.num_heads:
            raise ValueError(
                f"The hidden size ({hidden_dim}) must be divisible by the number "
                f"of heads ({self.num_heads})."
            )
        self.hidden_dim = hidden_dim
        self.head_dim = hidden_dim // self.num_heads
        policy = self.dtype_policy
        step_shape = (None, hidden_dim)
        self.attention_norms, self.attentions = [], []
        self.feed_forward_norms, self.feed_forwards = [], []
        for i in range(self.num_layers):
            sublayers = {
                "attention_norms": keras.layers.LayerNormalization(
                    epsilon=self.layer_norm_epsilon, dtype=policy, name=f"attention_norm_{i}"
                ),
                "attentions": FeedbackAttention(
                    num_heads=self.num_heads,
                    key_dim=self.head_dim,
                    max_relative_distance=self.max_relative_distance,
                    kernel_initializer=self.kernel_initializer,
                    use_dconv=self.use_dconv,
                    kernel_size=self.kernel_size,
                    dtype=policy,
                    name=f"attention_{i}",
                ),
                "feed_forward_norms": keras.layers.LayerNormalization(
                    epsilon=self.layer_norm_epsilon, dtype=policy, name=f"feed_forward_norm_{i}"
                ),
                "feed_forwards": FeedForward(
                    intermediate_dim=self.intermediate_dim,
                    activation=self.activation,
                    dropout=0.0,
                    kernel_initializer=self.kernel_initializer,
                    dtype=policy,
                    name=f"feed_forward_{i}",
                ),
            }
            for group, layer in sublayers.items():
                layer.build(step_shape)
                getattr(self, group).append(layer)
        # Never autocast: the softmax over layers is taken in float32
        # whatever the compute dtype (stored in the variable dtype, float32
        # under the mixed policies).
        self.layer_weights = self.add_weight(
            shape=(self.num_layers + 1,),
            initializer="ones",
            name="layer_weights",
            autocast=False,
        )
        # labml: per-layer value projections have a bias, the shared one not.
        kv_heads = (self.kv_groups, self.num_heads, self.head_dim)
        self.key_dense = keras.layers.EinsumDense(
            "bd,dghk->bghk",
            output_shape=kv_heads,
            kernel_initializer=self.kernel_initializer,
            dtype=policy,
            name="key",
        )
        self.value_dense = keras.layers.EinsumDense(
            "bd,dghk->bghk",
            output_shape=kv_heads,
            bias_axes=None if self.shared_kv else "ghk",
            kernel_initializer=self.kernel_initializer,
            dtype=policy,
            name="value",
        )
        self.key_dense.build(step_shape)
        self.value_dense.build(step_shape)
        # One kernel per (group, head, channel): one key and one value
        # kernel with shared K/V, a pair per layer otherwise.
        self.key_conv = self.value_conv = None
        if self.use_dconv:
            conv_input = (None, None, self.kv_groups * self.num_heads, self.head_dim)
            self.key_conv = CausalDepthwiseConv(self.kernel_size, dtype=policy, name="key_conv")
            self.value_conv = CausalDepthwiseConv(self.kernel_size, dtype=policy, name="value_conv")
            self.key_conv.build(conv_input)
            self.value_conv.build(conv_input)
        self.built = True

    # === Pieces of one step ===

    def mixing_weights(self):
        """`softmax(layer_weights)` in float32: weight of embedding, layer 1..L."""
        return ops.softmax(ops.cast(self.layer_weights, "float32"))

    def project_memory(self, memory):
        """Keys and values `[batch, kv_groups, num_heads, head_dim]` of slots `memory`."""
        return call_sublayer(self.key_dense, memory), call_sublayer(self.value_dense, memory)

    def _step(self, x, position, cache, key_mask, drop_masks, training):
        """One time step: returns `(top_output, memory_slot, next_cache)`.

        `cache` is the dict of `cache_layout()`: the key/value buffers
        `[batch, buffer_length, groups, heads, head_dim]` (the new slot's
        projections are written at `position`) and, with convolutions, their
        states.
        """
        x, memory, new_keys, new_values, next_cache = self._step_rows(
            x, position, cache, key_mask, drop_masks
        )
        next_cache["key"] = write_rows(cache["key"], new_keys[:, None], position)
        next_cache["value"] = write_rows(cache["value"], new_values[:, None], position)
        return x, memory, {name: next_cache[name] for name in self.cache_layout()}

    def _step_rows(self, x, position, cache, key_mask, drop_masks):
        """The step without the buffer writes: `(top_output, memory_slot,
        new_keys, new_values, next_conv_states)`. Reads only the buffer rows
        before `position` (the others are masked out)."""
        keys, values = cache["key"], cache["value"]
        buffer_length = ops.shape(keys)[1]
        offsets = ops.cast(position, "int32") - ops.arange(buffer_length, dtype="int32")
        valid = ops.greater_equal(offsets, 1)
        if self.memory_window is not None:
            valid = ops.logical_and(valid, ops.less_equal(offsets, self.memory_window))
        valid = valid[None, :]
        if key_mask is not None:
            valid = ops.logical_and(valid, key_mask)
        relative_index = ops.clip(offsets - 1, 0, self.max_relative_distance - 1)
        # At a step without memory the attention sublayer adds nothing.
        has_memory = ops.cast(ops.any(valid, axis=-1, keepdims=True), x.dtype)
        # With convolutions, a padding step's raw rows enter the conv states
        # as zeros (padding must not leak into later steps).
        keep = None
        if self.use_dconv and key_mask is not None:
            keep = ops.take(key_mask, ops.cast(position, "int32"), axis=1)
        query_states = []
        outputs = [x]
        # Each memory group's keys/values taken once (with shared K/V every
        # layer reads group 0): one slice of the buffers per step, not per layer.
        group_keys = [keys[:, :, g] for g in range(self.kv_groups)]
        group_values = [values[:, :, g] for g in range(self.kv_groups)]
        for i in range(self.num_layers):
            group = 0 if self.shared_kv else i
            attention = self.attentions[i]

            def attend(normed, i=i, group=group, attention=attention):
                # With convolutions the layer also takes and returns its
                # queries' conv history.
                conv = {"query_state": cache["query_conv"][:, i]} if self.conv_state_length else {}
                out = call_sublayer(
                    attention,
                    normed,
                    group_keys[group],
                    group_values[group],
                    relative_index,
                    valid,
                    query_keep=keep,
                    **conv,
                )
                if conv:
                    out, state = out
                    query_states.append(state)
                return out * has_memory

            x = pre_norm_residual(
                x,
                self.attention_norms[i],
                attend,
                drop=None if drop_masks is None else (lambda y: y * drop_masks[:, i, 0]),
                fast=True,
            )
            x = pre_norm_residual(
                x,
                self.feed_forward_norms[i],
                lambda normed: call_sublayer(self.feed_forwards[i], normed),
                drop=None if drop_masks is None else (lambda y: y * drop_masks[:, i, 1]),
                fast=True,
            )
            outputs.append(x)
        weights = ops.cast(self.mixing_weights(), x.dtype)
        memory = ops.einsum("l,lbd->bd", weights, ops.stack(outputs, axis=0))
        new_keys, new_values = self.project_memory(memory)
        next_cache = {}
        if self.use_dconv:
            new_keys, new_values, conv_states = convolve_memory(
                self, new_keys, new_values, cache, keep
            )
            next_cache.update(conv_states)
        if query_states:
            next_cache["query_conv"] = ops.stack(query_states, axis=1)
        return x, memory, new_keys, new_values, next_cache

    def cache_layout(self) -> dict:
        """Names and shapes of the cache tensors (`"batch"`/`"length"`
        stand for the sizes chosen at allocation), in a fixed order:

        * `key`, `value`: `[batch, length, kv_groups, num_heads,
          head_dim]`, the (convolved) key/value projections of past slots;
        * with `use_dconv` and `kernel_size > 1`: `query_conv` `[batch,
          num_layers, kernel_size - 1, num_heads, head_dim]`, each layer's raw
          queries of the previous steps, and `key_conv`, `value_conv`
          `[batch, kernel_size - 1, kv_groups, num_heads, head_dim]`, the raw
          key/value projections of the previous slots (oldest first).
        """
        heads = (int(self.num_heads), int(self.head_dim))
        groups = int(self.kv_groups)
        layout = {
            "key": ("batch", "length", groups) + heads,
            "value": ("batch", "length", groups) + heads,
        }
        history = self.conv_state_length
        if history:
            layout["query_conv"] = ("batch", int(self.num_layers), history) + heads
            layout["key_conv"] = ("batch", history, groups) + heads
            layout["value_conv"] = ("batch", history, groups) + heads
        return layout

    def empty_cache(self, batch_size, max_length):
        """A zero cache (dict of `cache_layout()`) for `max_length` steps."""
        sizes = {"batch": batch_size, "length": max_length}
        return {
            name: ops.zeros([sizes.get(d, d) for d in shape], dtype=self.compute_dtype)
            for name, shape in self.cache_layout().items()
        }

    def call(
        self,
        inputs,
        padding_mask=None,
        cache=None,
        cache_update_index=0,
        training=None,
    ):
        """Runs the layers over `inputs` step by step.

        Args:
            inputs: `[batch, n, hidden_dim]` embeddings of the steps
                `cache_update_index .. cache_update_index + n - 1`.
            padding_mask: Optional `[batch, buffer_length]` (False/0 =
                padding): padding slots are never attended to. Without a
                cache the buffer length is `n`.
            cache: None (training: an empty cache of length `n`) or the
                cache of earlier steps, a dict of `cache_layout()` (key/value
                buffers of `max_length` steps, and the convolution states).
            cache_update_index: Position of `inputs[:, 0]`.
            training: Enables dropout.

        Returns:
            Outputs `[batch, n, hidden_dim]`; with a cache `(outputs,
            next_cache)`.
        """
        use_cache = cache is not None
        batch_size = ops.shape(inputs)[0]
        length = inputs.shape[1]
        if length is None:
            length = ops.shape(inputs)[1]
        if not use_cache and recomputes_backward(self):
            key_mask = None if padding_mask is None else ops.cast(padding_mask, "bool")
            drop_masks = dropout_masks(self, batch_size, length, training)
            return run_recomputing_backward(self, inputs, key_mask, drop_masks, training)
        if not use_cache:
            cache = self.empty_cache(batch_size, length)
            cache_update_index = 0
        outputs, cache = run_steps(
            self,
            inputs,
            cache,
            cache_update_index,
            length,
            padding_mask=padding_mask,
            training=training,
        )
        return (outputs, cache) if use_cache else outputs

    def prefill(self, inputs, cache, num_steps, padding_mask=None):
        """Runs the first `num_steps` (may be a tensor) of `inputs` from step 0.

        Used by generation: the prompt is consumed one step per token and the
        loop stops at `num_steps`; outputs after it stay zero. Returns
        `(outputs, cache)`.

        A method, not a call through `__call__`, so it enters the autocast
        that `__call__` enters for `call` (mixed precision: the weights are
        read in the compute dtype, as in training and in the decoding step).
        """
        # Without it the float32 variables met the bfloat16 activations:
        # TensorFlow refused to multiply them, JAX promoted to float32.
        mixed = self.compute_dtype != self.variable_dtype
        with keras_backend.AutocastScope(self.compute_dtype) if mixed else contextlib.nullcontext():
            return run_steps(
                self, inputs, cache, 0, num_steps, padding_mask=padding_mask, force_loop=True
            )

    def compute_output_shape(self, input_shape, *args, **kwargs):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_layers": self.num_layers,
                "num_heads": self.num_heads,
                "intermediate_dim": self.intermediate_dim,
                "max_sequence_length": self.max_sequence_length,
                "activation": serialize_activation(self.activation),
                "dropout": self.dropout,
                "shared_kv": self.shared_kv,
                "memory_window": self.memory_window,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "seed": self.seed,
                "use_dconv": self.use_dconv,
                "kernel_size": self.kernel_size,
            }
        )
        return config
