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
* Training memory (JAX, TensorFlow): instead of labml's custom autograd
  `Stack`, the gradient of the whole loop is custom: the backward pass walks
  the steps in reverse and recomputes each from the final key/value buffers
  (`_run_recomputing_backward`), so no per-step buffer copies are kept;
  `stack.recompute_backward = False` differentiates the loop as written
  (PyTorch always does, and so do the convolution variants below). On
  TensorFlow without XLA (`model.fit` on a CPU), training, `evaluate` and
  `predict` run the forward and the backward loop as XLA-compiled functions
  inside the graph (`compiled_time_loop`); exported graphs keep plain ops.
* Attending to the current step (not in the paper or labml) is not offered:
  the current slot needs the outputs of all layers of the same step.

`use_dconv=True` adds Primer's MDHA convolutions (our extension, no reference
implements it; with `activation="squared_relu"` this is "Primer EZ +
Feedback"): causal depthwise convolutions of width `kernel_size` over time,
one kernel per head-channel, initialised as in Primer (0.5 on the current
step, the rest shared by the past ones), on

* each layer's queries: `q~_t = sum_i c_i q_{t-i}`, so a step needs that
  layer's raw queries of the `kernel_size - 1` previous steps (a per-layer
  conv state, updated every step);
* the memory's keys and values: slot `s` holds `sum_i c_i k_{s-i}` (same for
  values), applied once when the slot is written, from the raw projections
  of the previous slots (conv state: the last `kernel_size - 1` raw rows).
  Shared K/V: one pair of kernels; per-layer K/V: one pair per layer.

Slots and queries before step 0 are zero; a padding step's raw rows enter
the states as zeros, so left padding still gives the unpadded outputs. The
states are part of the decoding cache (`cache_layout`).
"""

import contextlib

import keras
from keras import ops
from keras.src import backend as keras_backend  # AutocastScope: not in the public API

from keras_primer.activations import get_activation, serialize_activation
from keras_primer.layers.cache_utils import export_safe_cache_writes_active, write_rows
from keras_primer.layers.causal_depthwise_conv import CausalDepthwiseConv, causal_depthwise_conv
from keras_primer.layers.feed_forward import FeedForward
from keras_primer.layers.feedback_attention import FeedbackAttention
from keras_primer.layers.residual import call_sublayer, pre_norm_residual
from keras_primer.utils.tracing import TraceFlag, in_tensorflow_xla_context


def _fori_loop(num_steps, body, state, max_steps):
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
        # `_run_recomputing_backward`); the forward pass is the same.
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
            attention_norm = keras.layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon, dtype=policy, name=f"attention_norm_{i}"
            )
            attention = FeedbackAttention(
                num_heads=self.num_heads,
                key_dim=self.head_dim,
                max_relative_distance=self.max_relative_distance,
                kernel_initializer=self.kernel_initializer,
                use_dconv=self.use_dconv,
                kernel_size=self.kernel_size,
                dtype=policy,
                name=f"attention_{i}",
            )
            feed_forward_norm = keras.layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon, dtype=policy, name=f"feed_forward_norm_{i}"
            )
            feed_forward = FeedForward(
                intermediate_dim=self.intermediate_dim,
                activation=self.activation,
                dropout=0.0,
                kernel_initializer=self.kernel_initializer,
                dtype=policy,
                name=f"feed_forward_{i}",
            )
            attention_norm.build(step_shape)
            attention.build(step_shape)
            feed_forward_norm.build(step_shape)
            feed_forward.build(step_shape)
            self.attention_norms.append(attention_norm)
            self.attentions.append(attention)
            self.feed_forward_norms.append(feed_forward_norm)
            self.feed_forwards.append(feed_forward)
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
                    keys[:, :, group],
                    values[:, :, group],
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
            new_keys, new_values, conv_states = self._convolve_memory(
                new_keys, new_values, cache, keep
            )
            next_cache.update(conv_states)
        if query_states:
            next_cache["query_conv"] = ops.stack(query_states, axis=1)
        return x, memory, new_keys, new_values, next_cache

    def _convolve_memory(self, new_keys, new_values, cache, keep):
        """The new slot's keys/values convolved over time with the raw rows of
        the previous slots; returns `(keys, values, next_conv_states)`."""
        states = {}
        convolved = []
        for name, rows, conv in (
            ("key_conv", new_keys, self.key_conv),
            ("value_conv", new_values, self.value_conv),
        ):
            if keep is not None:
                rows = rows * ops.cast(keep, rows.dtype)[:, None, None, None]
            kernel = ops.reshape(
                conv.channel_kernel(),
                (self.kernel_size, self.kv_groups, self.num_heads, self.head_dim),
            )
            out, state = causal_depthwise_conv(
                rows[:, None], kernel, state=cache.get(name), formulation="shifted"
            )
            convolved.append(out[:, 0])
            if state is not None:
                states[name] = state
        return convolved[0], convolved[1], states

    def _dropout_masks(self, batch_size, length, training):
        if not training or not self.dropout:
            return None
        shape = (length, batch_size, self.num_layers, 2, self.hidden_dim)
        keep = ops.greater_equal(
            keras.random.uniform(shape, seed=self.seed_generator), self.dropout
        )
        return ops.cast(keep, self.compute_dtype) / (1.0 - self.dropout)

    def cache_layout(self) -> dict:
        """Names and shapes of the cache tensors (`"batch"`/`"max_length"`
        stand for the sizes chosen at allocation), in a fixed order:

        * `key`, `value`: `[batch, max_length, kv_groups, num_heads,
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
            "key": ("batch", "max_length", groups) + heads,
            "value": ("batch", "max_length", groups) + heads,
        }
        history = self.conv_state_length
        if history:
            layout["query_conv"] = ("batch", int(self.num_layers), history) + heads
            layout["key_conv"] = ("batch", history, groups) + heads
            layout["value_conv"] = ("batch", history, groups) + heads
        return layout

    def empty_cache(self, batch_size, max_length):
        """A zero cache (dict of `cache_layout()`) for `max_length` steps."""
        sizes = {"batch": batch_size, "max_length": max_length}
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
        if not use_cache and self._recomputes_backward():
            key_mask = None if padding_mask is None else ops.cast(padding_mask, "bool")
            drop_masks = self._dropout_masks(batch_size, length, training)
            return self._run_recomputing_backward(inputs, key_mask, drop_masks, training)
        if not use_cache:
            cache = self.empty_cache(batch_size, length)
            cache_update_index = 0
        outputs, cache = self._run(
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
        """
        return self._run(inputs, cache, 0, num_steps, padding_mask=padding_mask, force_loop=True)

    def _run(
        self,
        inputs,
        cache,
        start,
        num_steps,
        padding_mask=None,
        training=None,
        force_loop=False,
    ):
        cache = {name: cache[name] for name in self.cache_layout()}
        key_mask = None
        if padding_mask is not None:
            key_mask = ops.cast(padding_mask, "bool")
        batch_size = ops.shape(inputs)[0]
        drop_masks = None
        if not force_loop:
            drop_masks = self._dropout_masks(batch_size, num_steps, training)
        start = ops.cast(start, "int32")

        if not force_loop and isinstance(num_steps, int) and num_steps == 1:
            # The decoding step: no loop, so the exported graph is plain ops.
            masks = None if drop_masks is None else drop_masks[0]
            out, _, cache = self._step(inputs[:, 0], start, cache, key_mask, masks, training)
            return out[:, None], cache

        def body(i, state):
            cache, outputs = state
            x = ops.take(inputs, i, axis=1)
            masks = None if drop_masks is None else ops.take(drop_masks, i, axis=0)
            out, _, cache = self._step(x, start + i, cache, key_mask, masks, training)
            return cache, write_rows(outputs, out[:, None], i)

        cache, outputs = _fori_loop(
            num_steps,
            body,
            (cache, ops.zeros_like(inputs)),
            max_steps=ops.shape(cache["key"])[1],
        )
        return outputs, cache

    # === The time loop with a memory-light backward pass (JAX, TensorFlow) ===

    def _recomputes_backward(self) -> bool:
        """Whether a cache-less call takes `_run_recomputing_backward`: on JAX
        and TensorFlow, without convolution states (their rows are not in the
        key/value buffers), unless `recompute_backward` is switched off or an
        exporter is tracing (the exported graphs stay plain ops)."""
        return (
            self.recompute_backward
            and keras.backend.backend() in ("jax", "tensorflow")
            and not self.conv_state_length
            and not export_safe_cache_writes_active()
        )

    def _rows_with_values(self, variables, values, x, position, keys, vals, key_mask, masks):
        """`_step_rows` as a function of the trainable variables' values.

        `variables` ends with the frozen ones (a LoRA base kernel, say),
        whose values are read outside the differentiated function. The
        backward pass runs after `__call__` has returned, so the autocast of
        mixed precision (the stack's compute dtype) is entered here too, and
        only then: an `AutocastScope(None)` makes every variable report
        float32.
        """
        mapping = list(zip(variables, values))
        mixed = self.compute_dtype != self.variable_dtype
        with (
            keras.StatelessScope(state_mapping=mapping),
            keras_backend.AutocastScope(self.compute_dtype) if mixed else contextlib.nullcontext(),
        ):
            out, _, new_keys, new_values, _ = self._step_rows(
                x, position, {"key": keys, "value": vals}, key_mask, masks
            )
        return out, new_keys, new_values

    def _forward_loop(self, variables, values, inputs, key_mask, drop_masks, length):
        """The training loop (no cache given) on explicit variable values;
        returns `(outputs, keys, values)` with the final buffers."""
        batch_size = ops.shape(inputs)[0]
        cache = self.empty_cache(batch_size, length)

        def body(i, state):
            keys, vals, outputs = state
            x = ops.take(inputs, i, axis=1)
            masks = None if drop_masks is None else ops.take(drop_masks, i, axis=0)
            out, new_keys, new_values = self._rows_with_values(
                variables, values, x, i, keys, vals, key_mask, masks
            )
            return (
                write_rows(keys, new_keys[:, None], i),
                write_rows(vals, new_values[:, None], i),
                write_rows(outputs, out[:, None], i),
            )

        keys, vals, outputs = _fori_loop(
            length, body, (cache["key"], cache["value"], ops.zeros_like(inputs)), length
        )
        return outputs, keys, vals

    def _run_recomputing_backward(self, inputs, key_mask, drop_masks, training=None):
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
        trainable = [v for v in self.variables if v.trainable]
        frozen = [v for v in self.variables if not v.trainable]
        variables = trainable + frozen  # every variable mapped, only the first ones differentiated
        values = [v.value for v in trainable]
        frozen_values = [v.value for v in frozen]
        inputs = ops.cast(inputs, self.compute_dtype)  # as `__call__` does (not stateless_call)
        if keras.backend.backend() == "tensorflow":
            requested = bool(training) or _compiled_loop.active
            compile_loops = requested and not in_tensorflow_xla_context()
            return self._recompute_tensorflow(
                variables, values, frozen_values, inputs, key_mask, drop_masks, compile_loops
            )
        return self._recompute_jax(variables, values, frozen_values, inputs, key_mask, drop_masks)

    def _recompute_jax(self, variables, values, frozen_values, inputs, key_mask, drop_masks):
        import jax
        import jax.numpy as jnp

        inputs = jnp.asarray(inputs)
        length = inputs.shape[1]

        @jax.custom_vjp
        def run(values, inputs, drop_masks):
            return self._forward_loop(
                variables, values + frozen_values, inputs, key_mask, drop_masks, length
            )[0]

        def forward(values, inputs, drop_masks):
            outputs, keys, vals = self._forward_loop(
                variables, values + frozen_values, inputs, key_mask, drop_masks, length
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
                    return self._rows_with_values(
                        variables, values + frozen_values, x, t, keys, vals, key_mask, masks
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
        self, variables, values, frozen_values, inputs, key_mask, drop_masks, compile_loops
    ):
        import tensorflow as tf

        num_trainable = len(values)

        def dense(grad, like):
            if grad is None:
                return tf.zeros_like(like)
            return tf.convert_to_tensor(grad)  # the relative tables' gathers give slices

        def forward(inputs, *all_values):
            length = tf.shape(inputs)[1]
            return self._forward_loop(
                variables, list(all_values), inputs, key_mask, drop_masks, length
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
                    out, new_keys, new_values = self._rows_with_values(
                        variables, values + frozen_values, x, t, keys, vals, key_mask, masks
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
