"""Feedback Transformer causal language model with cached generation."""

import keras
from keras import ops

from keras_primer.models.base import TiedHeadCausalLM
from keras_primer.models.feedback.feedback_backbone import FeedbackBackbone
from keras_primer.models.feedback.feedback_causal_lm_preprocessor import (
    FeedbackCausalLMPreprocessor,
)
from keras_primer.models.feedback.feedback_time_loop import compiled_time_loop


@keras.saving.register_keras_serializable(package="keras_primer")
class FeedbackCausalLM(TiedHeadCausalLM):
    """Next-token prediction head on a `FeedbackBackbone`, with `generate()`.

    `fit()` trains on strings when a preprocessor is attached (or on
    `{"token_ids", "padding_mask"}` dicts without one). `generate()` decodes
    with keras-hub samplers (`compile(sampler="greedy" | "top_k" | "top_p")`)
    and a cache of the feedback memory of past steps (its key/value
    projections), so every token, prompt tokens included, costs one step of
    all layers at one position.

    Args:
        backbone: A `FeedbackBackbone`.
        preprocessor: A `FeedbackCausalLMPreprocessor` or None.

    Example:

    >>> from keras_primer import (FeedbackBackbone, FeedbackCausalLM,
    ...     FeedbackCausalLMPreprocessor, FeedbackTokenizer)
    >>> backbone = FeedbackBackbone(vocabulary_size=256, num_layers=1,
    ...     num_heads=2, hidden_dim=16, intermediate_dim=32,
    ...     max_sequence_length=64)
    >>> preprocessor = FeedbackCausalLMPreprocessor(FeedbackTokenizer(), sequence_length=32)
    >>> lm = FeedbackCausalLM(backbone, preprocessor)
    >>> lm.compile(sampler="greedy")
    >>> lm.generate("ROMEO:", max_length=16).startswith("ROMEO:")
    True
    """

    backbone_cls = FeedbackBackbone
    preprocessor_cls = FeedbackCausalLMPreprocessor

    # `evaluate` and `predict` run the time loop as fast as `fit` does
    # (XLA-compiled on TensorFlow; see `compiled_time_loop`).
    def test_step(self, *args, **kwargs):
        with compiled_time_loop():
            return super().test_step(*args, **kwargs)

    def predict_step(self, *args, **kwargs):
        with compiled_time_loop():
            return super().predict_step(*args, **kwargs)

    def _score_hidden_states(self, token_ids, padding_mask, layer_intercept_fn):
        """`score`'s forward pass. The intercept sees the embeddings (-1) and
        the top layer's output (num_layers - 1) only: the other layers' outputs
        exist one time step at a time inside the feedback loop, never as a
        whole sequence."""
        backbone = self.backbone
        x = layer_intercept_fn(backbone.embed(token_ids), -1)
        x = backbone.feedback_stack(x, padding_mask=padding_mask)
        x = layer_intercept_fn(x, backbone.num_layers - 1)
        return backbone.layer_norm(x)

    def get_quantization_layer_structure(self, mode):
        """None for GPTQ/AWQ: those quantize whole-sequence blocks one after
        another, while the feedback layers run inside one time loop (each step
        reads every layer's earlier outputs), so there are no sequential
        blocks to hand over. `quantize("int8")`/`"int4"` work."""
        return None

    def call_with_cache(self, token_ids, cache, cache_update_index, padding_mask=None):
        """Forward pass for `token_ids` at `cache_update_index`, reusing `cache`.

        Args:
            token_ids: int `[batch, n]`, the tokens at positions
                `cache_update_index .. cache_update_index + n - 1` (`n = 1`
                while decoding: then there is no loop in the graph).
            cache: dict from `empty_cache()` (layout: `decoding_state_specs`):
                `"key"` and `"value"`, each `[batch, max_length, kv_groups,
                num_heads, head_dim]`, the key/value projections of the
                memory slots of past steps (`kv_groups` = 1 with shared
                keys/values, `num_layers` otherwise), and with `use_dconv`
                the convolution states `"query_conv"`, `"key_conv"`,
                `"value_conv"`. Rows at or after `cache_update_index` are
                ignored and overwritten; the convolution states must be those
                left by the step just before `cache_update_index`.
            cache_update_index: int (tensor), position of `token_ids[:, 0]`.
            padding_mask: Optional `[batch, max_length]` mask (False =
                padding slots, never attended to); None = no padding.

        Returns:
            `(logits, hidden_states, next_cache)`.
        """
        backbone = self.backbone
        x = backbone.embed(token_ids)
        x, next_cache = backbone.feedback_stack(
            x,
            padding_mask=padding_mask,
            cache=cache,
            cache_update_index=cache_update_index,
        )
        hidden_states = backbone.layer_norm(x)
        logits = backbone.token_embedding(hidden_states, reverse=True)
        return logits, hidden_states, next_cache

    # === Decoding state layout: declared once, by the stack
    # (`FeedbackStack.cache_layout`); `empty_cache`, the exporters and ONNX
    # Runtime read it ===
    def decoding_state_specs(self):
        """The cache tensors as `keras_primer_runtime.generation.StateSpec`s,
        from `FeedbackStack.cache_layout()`: `key` and `value`, each `[batch,
        length, kv_groups, num_heads, head_dim]` (`kv_groups` = 1 with
        shared keys/values, else `num_layers`; ONNX
        `past_key_values.memory.key`/`.value`), and with `use_dconv`
        `query_conv` `[batch, num_layers, kernel_size - 1, num_heads,
        head_dim]`, `key_conv` and `value_conv` `[batch, kernel_size - 1,
        kv_groups, num_heads, head_dim]` (ONNX: their names)."""
        from keras_primer_runtime.generation import StateSpec

        onnx_names = {"key": "past_key_values.memory.key", "value": "past_key_values.memory.value"}
        layout = self.backbone.feedback_stack.cache_layout()
        return [
            StateSpec((name,), shape, onnx_names.get(name, name)) for name, shape in layout.items()
        ]

    def empty_cache(self, batch_size, max_length):
        """A zero cache for sequences of up to `max_length` tokens."""
        return self.backbone.feedback_stack.empty_cache(batch_size, max_length)

    def _build_cache(self, token_ids, num_steps, padding_mask=None):
        """Runs the first `num_steps` tokens one step each; returns
        `(hidden_states, cache)` (hidden states are zero from `num_steps` on)."""
        backbone = self.backbone
        batch_size, max_length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        x, cache = backbone.feedback_stack.prefill(
            backbone.embed(token_ids),
            self.empty_cache(batch_size, max_length),
            num_steps,
            padding_mask=padding_mask,
        )
        return backbone.layer_norm(x), cache

    def _prefill(self, token_ids, first_step_index):
        # The prefill stops before the first step's position: the prompt costs
        # one step per token.
        return self._build_cache(token_ids, ops.maximum(first_step_index, 0))
