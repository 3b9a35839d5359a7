"""What the exporters need to know about a causal LM, read from the model.

An exporter never touches model internals. `get_adapter(model)` returns a
`CausalLMAdapter`, which reads

* the decoding-state layout from `model.decoding_state_specs()` (each family
  describes its cache once, beside `empty_cache`/`call_with_cache`),
* the tokenizer description from `keras_primer.tokenizers.tokenizer_spec`
  (unknown tokenizers are refused there),
* the family from the model registry (`keras_primer.models.registry`),

and offers `empty_state`, `prefill`, `step(token_ids, state, position)` (logits
`[batch, n, vocab]` of `n` tokens at `position .. position + n - 1` and the
next state) and `logits(token_ids, padding_mask)` (uncached). A new model
family needs `empty_cache`, `call_with_cache` and `decoding_state_specs` on
its causal LM, and its registry entry.
"""

import keras

from keras_primer.models.registry import model_entry
from keras_primer.tokenizers import tokenizer_spec


class CausalLMAdapter:
    """The export view of one causal LM (state layout, tokenizer, step)."""

    def __init__(self, model, family):
        self.model = model
        self.family = family
        self.tokenizer, self.proto = tokenizer_spec(model)
        self.vocabulary_size = int(model.backbone.vocabulary_size)
        self.max_sequence_length = int(model.backbone.max_sequence_length)
        if self.tokenizer.vocabulary_size > self.vocabulary_size:
            raise ValueError(
                f"The tokenizer has {self.tokenizer.vocabulary_size} ids but the model only "
                f"{self.vocabulary_size}: it cannot be exported."
            )
        self.state_specs = list(model.decoding_state_specs())

    def empty_state(self, batch_size, max_length):
        return self.model.empty_cache(batch_size, max_length)

    def prefill(self, token_ids, first_step_index):
        """The cache after the positions before `first_step_index`, from a
        fixed-shape block of prompt ids, as Keras `generate` prefills it."""
        _, cache = self.model._prefill(token_ids, first_step_index)
        return cache

    def step(self, token_ids, state, position):
        logits, _, next_state = self.model.call_with_cache(token_ids, dict(state), position)
        return logits, next_state

    def logits(self, token_ids, padding_mask):
        return self.model({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)

    def metadata(self):
        """JSON-able description written next to the exported files."""
        return {
            "family": self.family,
            "vocabulary_size": self.vocabulary_size,
            "max_sequence_length": self.max_sequence_length,
            "tokenizer": self.tokenizer.to_json(),
            "states": [spec.to_json() for spec in self.state_specs],
        }


def get_adapter(model):
    """The adapter of `model`; clear error for unsupported models or tokenizers."""
    try:
        entry = model_entry(model)
    except ValueError as error:
        raise ValueError(f"Cannot export a {type(model).__name__}: {error}") from None
    if not entry.exportable:
        raise ValueError(
            f"Cannot export a {type(model).__name__}: it is the reference model "
            f"{entry.name!r} of the comparisons, not a keras-primer model."
        )
    return CausalLMAdapter(model, entry.family)


def load_float32(path):
    """Loads a `.keras` file and returns a float32 copy of the model.

    Models trained with a mixed or bfloat16 policy are rebuilt from their
    config with `dtype="float32"` and get the (upcast) weights, so that the
    exported artefacts always hold float32 weights.
    """
    model = keras.saving.load_model(path, compile=False)
    policy = keras.dtype_policies.get(model.dtype_policy)
    if policy.name == "float32" and all(
        keras.backend.standardize_dtype(v.dtype) == "float32" for v in model.weights
    ):
        return model
    config = keras.saving.serialize_keras_object(model)

    def force_float32(node):
        if isinstance(node, dict):
            for key, value in list(node.items()):
                if key == "dtype" and not isinstance(value, (int, float)) and value is not None:
                    if isinstance(value, dict) and value.get("class_name", "").endswith(
                        "DTypePolicy"
                    ):
                        # Only float policies: the tokenizer's `int32` policy must stay
                        # (an integer layer refuses a float dtype when it is rebuilt).
                        name = str(value.get("config", {}).get("name", ""))
                        if "float" in name:
                            node[key] = "float32"
                    elif isinstance(value, str) and ("float16" in value or "bfloat16" in value):
                        node[key] = "float32"
                    else:
                        force_float32(value)
                else:
                    force_float32(value)
        elif isinstance(node, list):
            for value in node:
                force_float32(value)

    force_float32(config)
    clone = keras.saving.deserialize_keras_object(config)
    clone.set_weights([keras.ops.cast(w, "float32") for w in model.get_weights()])
    return clone
