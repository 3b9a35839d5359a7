"""Bases shared by the model families: checked backbones and the LM head."""

import keras
from keras_hub.metrics import Perplexity
from keras_hub.models import Backbone, CausalLM

from keras_primer.models.generation import GenerateInputChecks
from keras_primer.utils.validation import check_padding_mask, check_token_ids


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
