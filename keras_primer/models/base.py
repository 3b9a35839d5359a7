"""Bases shared by the model families: checked backbones and the LM head."""

import keras
from keras_hub.layers import ReversibleEmbedding
from keras_hub.metrics import Perplexity
from keras_hub.models import Backbone, CausalLM

from keras import ops

from keras_primer.models.generation import GenerateInputChecks, finish_generation
from keras_primer.utils.validation import check_padding_mask, check_token_ids


def normal_initializer(stddev: float = 0.02):
    """The N(0, 0.02) initializer of GPT-2-style embeddings and kernels."""
    return keras.initializers.RandomNormal(stddev=stddev)


def token_embedding(vocabulary_size: int, hidden_dim: int, tie_weights: bool, dtype=None):
    """Token embedding that doubles as the LM head (`reverse=True`)."""
    return ReversibleEmbedding(
        input_dim=vocabulary_size,
        output_dim=hidden_dim,
        tie_weights=tie_weights,
        embeddings_initializer=normal_initializer(),
        dtype=dtype,
        name="token_embedding",
    )


class CheckedBackbone(Backbone):
    """A keras-hub `Backbone` whose calls validate `token_ids`/`padding_mask`.

    Subclasses set `vocabulary_size` and `max_sequence_length`.
    """

    def call(self, inputs, training=None, mask=None):
        token_ids = inputs["token_ids"] if isinstance(inputs, dict) else inputs
        check_token_ids(token_ids, self.vocabulary_size, self.max_sequence_length)
        if isinstance(inputs, dict):
            check_padding_mask(inputs.get("padding_mask"), token_ids)
        return super().call(inputs, training=training, mask=mask)


class TiedHeadCausalLM(GenerateInputChecks, CausalLM):
    """Causal LM whose logits come from the backbone's (reversible) token
    embedding, with input checks and perplexity among the default metrics."""

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto", sampler="top_k", **kwargs):
        """keras-hub defaults, plus perplexity among the metrics."""
        if weighted_metrics == "auto":
            weighted_metrics = [
                keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                Perplexity(from_logits=True, name="perplexity"),
            ]
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )

    def get_compile_config(self):
        """Keras' compile config plus the sampler, so a loaded model generates
        as the saved one did."""
        config = super().get_compile_config()
        if config and getattr(self, "sampler", None) is not None:
            config["sampler"] = keras.saving.serialize_keras_object(self.sampler)
        return config

    def compile_from_config(self, config):
        """Compiles a loaded model with its saved optimizer, loss, metrics and
        sampler (Keras skips this for models that override `compile`).

        `jit_compile` is left to resolve on the loading backend: a file saved
        with XLA on JAX must not switch on `torch.compile` under PyTorch.
        """
        config = dict(keras.saving.deserialize_keras_object(config))
        config.pop("jit_compile", None)
        self.compile(**config)
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def _prefill(self, token_ids, first_step_index):
        """Returns `(hidden_states, cache)` ready for a first decoding step at
        position `first_step_index` (keras-hub's sampler re-runs that position)."""
        raise NotImplementedError

    def generate_step(self, inputs, stop_token_ids=None):
        """One compiled generation call for a batch of right-padded prompts."""
        token_ids, padding_mask = inputs["token_ids"], inputs["padding_mask"]
        row_lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=-1)
        index = ops.min(row_lengths)
        hidden_states, cache = self._prefill(token_ids, index - 1)

        def next(prompt, cache, index):
            cache_update_index = index - 1
            batch_size = ops.shape(prompt)[0]
            prompt = ops.slice(prompt, [0, cache_update_index], [batch_size, 1])
            logits, hidden_states, cache = self.call_with_cache(
                prompt, cache, cache_update_index
            )
            return ops.squeeze(logits, axis=1), ops.squeeze(hidden_states, axis=1), cache

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )
        return finish_generation(token_ids, padding_mask, stop_token_ids)
