"""Per-family adapters: what the exporters need to know about a causal LM.

An exporter never touches model internals directly. It asks the adapter for

* `state_specs(max_length)`: the decoding-state tensors, as
  `{name: (shape, dtype)}` with `None` for dynamic axes (batch first),
* `empty_state(batch_size, max_length)`: zero states of those shapes,
* `step(token_ids, state, position)`: logits `[batch, n, vocab]` of `n`
  tokens that sit at `position .. position + n - 1`, and the next state,
* `logits(token_ids, padding_mask)`: a full, uncached forward pass,

plus the tokenizer constants (`vocabulary_size`, `start_id`, `end_id`,
`pad_id`, `max_sequence_length`). A new model family (for example the
Feedback Transformer, whose state is the memory of past steps) only adds an
adapter class and registers it in `ADAPTERS`.
"""

import keras


class CausalLMAdapter:
    """Base class; subclasses fill in the state layout and the cached step."""

    family = None
    #: Names of the state tensors, in the order the ONNX step model uses.
    state_names = ()

    def __init__(self, model):
        self.model = model
        tokenizer = getattr(getattr(model, "preprocessor", None), "tokenizer", None)
        self.vocabulary_size = int(model.backbone.vocabulary_size)
        self.max_sequence_length = int(model.backbone.max_sequence_length)
        self.start_id = int(getattr(tokenizer, "start_token_id", 2) if tokenizer else 2)
        self.end_id = int(getattr(tokenizer, "end_token_id", 3) if tokenizer else 3)
        self.pad_id = int(getattr(tokenizer, "pad_token_id", 0) if tokenizer else 0)
        self.add_start_token = bool(
            getattr(getattr(model, "preprocessor", None), "add_start_token", True)
        )

    # --- to implement -------------------------------------------------------
    def state_specs(self, max_length=None):
        raise NotImplementedError

    def empty_state(self, batch_size, max_length):
        raise NotImplementedError

    def step(self, token_ids, state, position):
        raise NotImplementedError

    # --- shared -------------------------------------------------------------
    def logits(self, token_ids, padding_mask):
        return self.model({"token_ids": token_ids, "padding_mask": padding_mask}, training=False)

    def metadata(self):
        """JSON-able description written next to the exported files."""
        return {
            "family": self.family,
            "vocabulary_size": self.vocabulary_size,
            "max_sequence_length": self.max_sequence_length,
            "start_id": self.start_id,
            "end_id": self.end_id,
            "pad_id": self.pad_id,
            "add_start_token": self.add_start_token,
            "special_ids": sorted({self.start_id, self.end_id, self.pad_id}),
            "states": {
                name: {"shape": [d if d is not None else -1 for d in shape], "dtype": dtype}
                for name, (shape, dtype) in self.state_specs().items()
            },
        }


class PrimerAdapter(CausalLMAdapter):
    """`PrimerCausalLM` (Primer EZ and the baseline without convolutions).

    State: `key_value` `[batch, layers, 2, max_length, heads, head_dim]` and,
    with convolutions, `conv` `[batch, layers, 3, kernel_size - 1, heads,
    head_dim]`, exactly the cache of `PrimerCausalLM.call_with_cache`.
    """

    family = "primer"

    def __init__(self, model):
        super().__init__(model)
        backbone = model.backbone
        self._heads = [int(backbone.num_heads), int(backbone.head_dim)]
        self._layers = int(backbone.num_layers)
        self._conv = int(backbone.conv_state_length)
        self.state_names = ("key_value", "conv") if self._conv else ("key_value",)

    def state_specs(self, max_length=None):
        specs = {"key_value": ([None, self._layers, 2, max_length] + self._heads, "float32")}
        if self._conv:
            specs["conv"] = ([None, self._layers, 3, self._conv] + self._heads, "float32")
        return specs

    def empty_state(self, batch_size, max_length):
        return self.model.empty_cache(batch_size, max_length)

    def step(self, token_ids, state, position):
        logits, _, next_state = self.model.call_with_cache(token_ids, dict(state), position)
        return logits, next_state


class CachedCausalLMAdapter(CausalLMAdapter):
    """Any causal LM with `empty_cache(batch, max_length)` (a dict of tensors)
    and `call_with_cache(token_ids, cache, index) -> (logits, hidden, cache)`.

    The batch axis is axis 0; the `max_length` axis of each state is found by
    comparing `empty_cache(1, 2)` with `empty_cache(1, 3)`.
    """

    def __init__(self, model):
        super().__init__(model)
        small, large = model.empty_cache(1, 2), model.empty_cache(1, 3)
        self.state_names = tuple(small)
        self._shapes = {}
        for name in self.state_names:
            a, b = list(small[name].shape), list(large[name].shape)
            self._shapes[name] = [None] + [None if x != y else int(x) for x, y in zip(a[1:], b[1:])]

    def state_specs(self, max_length=None):
        return {
            name: ([None] + [max_length if d is None else d for d in shape[1:]], "float32")
            for name, shape in self._shapes.items()
        }

    def empty_state(self, batch_size, max_length):
        return self.model.empty_cache(batch_size, max_length)

    def step(self, token_ids, state, position):
        logits, _, next_state = self.model.call_with_cache(token_ids, dict(state), position)
        return logits, next_state


class FeedbackAdapter(CachedCausalLMAdapter):
    """`FeedbackCausalLM`: state `key`/`value` `[batch, max_length, kv_groups,
    heads, head_dim]`, the memory of past steps (shared or per-layer)."""

    family = "feedback"


ADAPTERS = {"PrimerCausalLM": PrimerAdapter, "FeedbackCausalLM": FeedbackAdapter}


def register_adapter(class_name, adapter_cls):
    """Makes `get_adapter` use `adapter_cls` for models of class `class_name`."""
    ADAPTERS[class_name] = adapter_cls


def get_adapter(model):
    """The adapter of `model`'s family; clear error for unsupported models."""
    for cls in type(model).__mro__:
        if cls.__name__ in ADAPTERS:
            return ADAPTERS[cls.__name__](model)
    if hasattr(model, "empty_cache") and hasattr(model, "call_with_cache"):
        return CachedCausalLMAdapter(model)
    raise ValueError(
        f"Cannot export a {type(model).__name__}: supported model classes are "
        f"{sorted(ADAPTERS)}."
    )


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
                    if isinstance(value, dict) and value.get("class_name", "").endswith("DTypePolicy"):
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
