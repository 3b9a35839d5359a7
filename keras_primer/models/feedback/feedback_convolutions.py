"""Primer's MDHA inside the Feedback step (our extension; no reference implements it).

`FeedbackStack(use_dconv=True)` adds Primer's MDHA convolutions (with
`activation="squared_relu"` this is "Primer EZ + Feedback"): causal
depthwise convolutions of width `kernel_size` over time,
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
states are part of the decoding cache (`FeedbackStack.cache_layout`).

The queries' convolution is the layer's own (`FeedbackAttention`); this
module convolves the memory's keys and values when a slot is written.
"""

from keras import ops

from keras_primer.layers.causal_depthwise_conv import causal_depthwise_conv


def convolve_memory(stack, new_keys, new_values, cache, keep):
    """The new slot's keys/values convolved over time with the raw rows of
    the previous slots; returns `(keys, values, next_conv_states)`."""
    states = {}
    convolved = []
    for name, rows, conv in (
        ("key_conv", new_keys, stack.key_conv),
        ("value_conv", new_values, stack.value_conv),
    ):
        if keep is not None:
            rows = rows * ops.cast(keep, rows.dtype)[:, None, None, None]
        kernel = ops.reshape(
            conv.channel_kernel(),
            (stack.kernel_size, stack.kv_groups, stack.num_heads, stack.head_dim),
        )
        out, state = causal_depthwise_conv(
            rows[:, None], kernel, state=cache.get(name), formulation="shifted"
        )
        convolved.append(out[:, 0])
        if state is not None:
            states[name] = state
    return convolved[0], convolved[1], states
