"""Primer EZ causal language model with cached generation."""

import keras
from keras import ops

from keras_primer.models.base import TiedHeadCausalLM, empty_cache
from keras_primer.models.primer.primer_backbone import PrimerBackbone
from keras_primer.models.primer.primer_causal_lm_preprocessor import (
    PrimerCausalLMPreprocessor,
)


@keras.saving.register_keras_serializable(package="keras_primer")
class PrimerCausalLM(TiedHeadCausalLM):
    """Next-token prediction head on a `PrimerBackbone`, with `generate()`.

    `fit()` trains on strings when a preprocessor is attached (or on
    `{"token_ids", "padding_mask"}` dicts without one); `generate()` decodes
    with keras-hub samplers (`compile(sampler="greedy" | "top_k" | "top_p")`)
    and a key/value + convolution-state cache, one step per new token.

    Args:
        backbone: A `PrimerBackbone`.
        preprocessor: A `PrimerCausalLMPreprocessor` or None.

    Example:

    >>> from keras_primer import (PrimerBackbone, PrimerCausalLM,
    ...     PrimerCausalLMPreprocessor, PrimerTokenizer)
    >>> backbone = PrimerBackbone(vocabulary_size=256, num_layers=1,
    ...     num_heads=2, hidden_dim=16, intermediate_dim=32,
    ...     max_sequence_length=64)
    >>> preprocessor = PrimerCausalLMPreprocessor(PrimerTokenizer(), sequence_length=32)
    >>> lm = PrimerCausalLM(backbone, preprocessor)
    >>> lm.compile(sampler="greedy")
    >>> lm.generate("ROMEO:", max_length=16).startswith("ROMEO:")
    True
    """

    backbone_cls = PrimerBackbone
    preprocessor_cls = PrimerCausalLMPreprocessor

    def _score_hidden_states(self, token_ids, padding_mask, layer_intercept_fn):
        """`score`'s forward pass: the intercept sees the embeddings (-1, token
        plus position) and the output of every decoder block (0 ..
        num_layers - 1)."""
        backbone = self.backbone
        x = layer_intercept_fn(backbone.embed(token_ids, padding_mask), -1)
        for i, block in enumerate(backbone.transformer_layers):
            x = layer_intercept_fn(block(x, padding_mask=padding_mask), i)
        return backbone.layer_norm(x)

    def get_quantization_layer_structure(self, mode):
        """GPTQ/AWQ layout: the whole embedding (tokens, positions, dropout) as
        the pre-block layer, then the decoder blocks in order."""
        if mode not in ("gptq", "awq"):
            return None
        backbone = self.backbone
        token_ids = keras.Input(shape=(None,), dtype="int32")
        embed = keras.Model(token_ids, backbone.embed(token_ids), name="embed")
        return {
            "pre_block_layers": [embed],
            "sequential_blocks": backbone.transformer_layers,
        }

    # === Cached decoding ===

    def call_with_cache(
        self,
        token_ids,
        cache,
        cache_update_index,
        padding_mask=None,
        conv_state_index=None,
    ):
        """Forward pass for `token_ids` at `cache_update_index`, reusing `cache`.

        Args:
            token_ids: int `[batch, n]`, the tokens at positions
                `cache_update_index .. cache_update_index + n - 1`.
            cache: dict of per-layer lists (`decoding_state_specs`):
                `"key"`, `"value"`, each `[batch, num_heads, length,
                head_dim]` (post-conv keys/values, heads first) and, with
                convolutions, `"conv"` `[batch, 3, kernel_size - 1,
                num_heads, head_dim]` (the pre-conv q, k, v rows before the
                next position).
            cache_update_index: int (tensor), position of `token_ids[:, 0]`.
            padding_mask: Optional `[batch, length]` mask of the whole
                sequence (False = padding, on either side); None = no padding.
            conv_state_index: Optional position, relative to
                `cache_update_index`, before which the returned conv state is
                taken (default: after the last token).

        Returns:
            `(logits, hidden_states, next_cache)`.
        """
        backbone = self.backbone
        x = backbone.embed(token_ids, padding_mask, start_index=cache_update_index)
        next_cache = {name: [] for name in cache}
        for i, block in enumerate(backbone.transformer_layers):
            x, layer_cache = block(
                x,
                padding_mask=padding_mask,
                cache={name: tensors[i] for name, tensors in cache.items()},
                cache_update_index=cache_update_index,
                conv_state_index=conv_state_index,
            )
            for name, tensor in layer_cache.items():
                next_cache[name].append(tensor)
        hidden_states = backbone.layer_norm(x)
        logits = backbone.token_embedding(hidden_states, reverse=True)
        return logits, hidden_states, next_cache

    # === Decoding state layout: declared here once; `empty_cache`, the
    # exporters and ONNX Runtime read it ===
    def decoding_state_specs(self):
        """The cache tensors as `keras_primer_runtime.generation.StateSpec`s,
        per layer `i`: `("key", i)` and `("value", i)` `[batch, num_heads,
        length, head_dim]` (ONNX `past_key_values.i.key`/`.value`, Optimum's
        names and layout) and, with convolutions, `("conv", i)` `[batch, 3,
        kernel_size - 1, num_heads, head_dim]` (ONNX `conv_state.i`)."""
        from keras_primer_runtime.generation import StateSpec

        b = self.backbone
        heads, head_dim = int(b.num_heads), int(b.head_dim)
        specs = [
            StateSpec(
                (name, i), ("batch", heads, "length", head_dim), f"past_key_values.{i}.{name}"
            )
            for i in range(b.num_layers)
            for name in ("key", "value")
        ]
        if b.conv_state_length:
            specs += [
                StateSpec(
                    ("conv", i),
                    ("batch", 3, int(b.conv_state_length), heads, head_dim),
                    f"conv_state.{i}",
                )
                for i in range(b.num_layers)
            ]
        return specs

    def empty_cache(self, batch_size, max_length):
        """A zero cache for sequences of up to `max_length` tokens."""
        return empty_cache(self, batch_size, max_length)

    def _build_cache(self, token_ids, padding_mask=None, conv_state_index=None):
        """Prefills a cache with `token_ids`; returns `(hidden_states, cache)`."""
        batch_size, max_length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        cache = self.empty_cache(batch_size, max_length)
        _, hidden_states, cache = self.call_with_cache(
            token_ids,
            cache,
            0,
            padding_mask=padding_mask,
            conv_state_index=conv_state_index,
        )
        return hidden_states, cache

    def _prefill(self, token_ids, first_step_index):
        # The conv state must hold the rows before the first step's position,
        # not the rows after the padded end of the batch.
        return self._build_cache(token_ids, conv_state_index=first_step_index)
