"""Bases shared by the model families: checked backbones and the LM head."""

import json
import os

import keras
import numpy as np
from keras import ops
from keras_hub.models import Backbone, CausalLM, Task

from keras_primer.generation import ContractSampler, get_sampler
from keras_primer.generation.causal_lm_generation import GenerateInputChecks, finish_generation
from keras_primer.utils.validation import check_padding_mask, check_token_ids

SCORING_MODES = ("logits", "loss")
# Perplexity is reported as exp(min(loss, cap)): a diverged run logs a large
# finite number instead of inf.
PERPLEXITY_LOSS_CAP = 50.0


def normal_initializer(stddev: float = 0.02):
    """The N(0, 0.02) initializer of GPT-2-style embeddings and kernels."""
    return keras.initializers.RandomNormal(stddev=stddev)


def token_embedding(vocabulary_size: int, hidden_dim: int, tie_weights: bool, dtype=None):
    """Token embedding that doubles as the LM head (`reverse=True`).

    Keras' own `ReversibleEmbedding` (not a subclass): its `quantize` refuses
    subclasses, and this is the largest matrix of a small model.
    """
    return keras.layers.ReversibleEmbedding(
        input_dim=vocabulary_size,
        output_dim=hidden_dim,
        tie_weights=tie_weights,
        embeddings_initializer=normal_initializer(),
        dtype=dtype,
        name="token_embedding",
    )


def empty_cache(causal_lm, batch_size, max_length):
    """A zero decoding cache for `max_length` positions, laid out as the
    model's `decoding_state_specs()` say, in its compute dtype."""
    from keras_primer_runtime.generation import empty_structure

    return empty_structure(
        causal_lm.decoding_state_specs(),
        lambda spec: ops.zeros(
            spec.concrete(batch_size, max_length), dtype=causal_lm.compute_dtype
        ),
    )


def _holds_known_values(x) -> bool:
    """True for host data (NumPy, lists), whose values cost no device sync."""
    return isinstance(x, (np.ndarray, list, tuple))


def check_model_inputs(inputs, vocabulary_size: int, max_sequence_length: int) -> None:
    """Checks host data (NumPy arrays, lists) given to a model: dtype, rank,
    length and every id value, before Keras converts and casts it.

    Tensors are left to the backbone's `call`, which checks dtype, rank and
    length after the functional model's casts and never reads values, so no
    training step syncs with the device. Symbolic passes (Keras' build under a
    `tf.distribute` strategy feeds the mean of a batch) are tensors too.
    """
    token_ids = inputs["token_ids"] if isinstance(inputs, dict) else inputs
    if token_ids is None or not _holds_known_values(token_ids):
        return
    check_token_ids(token_ids, vocabulary_size, max_sequence_length)
    if isinstance(inputs, dict):
        check_padding_mask(inputs.get("padding_mask"), token_ids)


def _keras_hub_task_name(task_cls) -> str:
    """The keras-hub task a model class implements (`"CausalLM"`), as
    keras-hub's own models name it in preset metadata."""
    for base in task_cls.__mro__[1:]:
        if base.__module__.startswith("keras_hub"):
            return base.__name__
    return task_cls.__name__


class CheckedBackbone(Backbone):
    """A keras-hub `Backbone` that checks its inputs and writes keras-hub's
    preset metadata.

    Subclasses set `vocabulary_size` and `max_sequence_length`. Shapes and
    dtypes are checked in `call`; id values only for host (NumPy) inputs, in
    `__call__`, before Keras turns them into tensors, never inside a
    training step.
    """

    def __call__(self, inputs, *args, **kwargs):
        if self.built and hasattr(self, "vocabulary_size"):
            check_model_inputs(inputs, self.vocabulary_size, self.max_sequence_length)
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs, training=None, mask=None):
        token_ids = inputs["token_ids"] if isinstance(inputs, dict) else inputs
        check_token_ids(
            token_ids, self.vocabulary_size, self.max_sequence_length, check_values=False
        )
        if isinstance(inputs, dict):
            check_padding_mask(inputs.get("padding_mask"), token_ids)
        return super().call(inputs, training=training, mask=mask)

    def save_to_preset(self, preset_dir, max_shard_size=10):
        """keras-hub's `save_to_preset`; the metadata's `"tasks"` name the
        keras-hub task classes (`"CausalLM"`), as for keras-hub's models,
        rather than our private intermediate base class."""
        super().save_to_preset(preset_dir, max_shard_size=max_shard_size)
        path = os.path.join(preset_dir, "metadata.json")
        if not os.path.exists(path):
            return
        with open(path) as f:
            metadata = json.load(f)
        tasks = [
            obj
            for obj in set(keras.saving.get_custom_objects().values())
            if isinstance(obj, type)
            and issubclass(obj, Task)
            and getattr(obj, "backbone_cls", None) is type(self)
        ]
        metadata["tasks"] = sorted({_keras_hub_task_name(t) for t in tasks})
        with open(path, "w") as f:
            f.write(json.dumps(metadata, indent=4))


def _tokenizer_size(preprocessor) -> int | None:
    """The preprocessor's vocabulary size, or None while it is unknown: a
    SentencePiece tokenizer loaded from a `.keras` file gets its proto from
    the file's assets only after the model is constructed."""
    tokenizer = getattr(preprocessor, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "vocabulary_size"):
        return None
    try:
        return int(tokenizer.vocabulary_size())
    except ValueError:  # keras-hub: "No vocabulary has been set"
        return None


class TiedHeadCausalLM(GenerateInputChecks, CausalLM):
    """Causal LM whose logits come from the backbone's (reversible) token
    embedding, with input checks and perplexity among the default metrics."""

    def __init__(self, backbone, preprocessor=None, **kwargs):
        tokenizer_size = _tokenizer_size(preprocessor)
        if tokenizer_size is not None and tokenizer_size > backbone.vocabulary_size:
            raise ValueError(
                f"The preprocessor's tokenizer has {tokenizer_size} ids but the "
                f"backbone's vocabulary_size is {backbone.vocabulary_size}: some "
                "token ids would have no embedding. Build the backbone with "
                f"vocabulary_size >= {tokenizer_size}."
            )
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def __call__(self, inputs, *args, **kwargs):
        if self.built:
            backbone = self.backbone
            check_model_inputs(inputs, backbone.vocabulary_size, backbone.max_sequence_length)
        return super().__call__(inputs, *args, **kwargs)

    def compile(
        self, optimizer="auto", loss="auto", *, weighted_metrics="auto", sampler=None, **kwargs
    ):
        """keras-hub defaults, with three changes.

        * `loss="auto"` is the cross-entropy averaged over real tokens
          (`reduction="mean_with_sample_weight"`), so the logged loss does not
          shrink with the amount of padding and `exp(loss)` equals the
          perplexity metric on a batch (keras-hub averages over every
          position, padding included).
        * The default metrics are accuracy (weighted by the padding mask)
          and perplexity, reported as `exp(loss)` instead of a second
          cross-entropy over the logits (keras-hub's `Perplexity` metric
          costs a second pass over them in every training step).
        * `sampler` defaults to the decoding contract's `ContractSampler()`
          (greedy; `ContractSampler(temperature=..., top_k=..., top_p=...,
          seed=...)` samples by the rules of the SavedModel and ONNX
          Runtime); `generate` checks any sampler against the contract
          before the first token (`keras_primer.generation.check_sampler`).
        """
        sampler = get_sampler(sampler)
        if isinstance(loss, str) and loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight"
            )
        self._perplexity_from_loss = weighted_metrics == "auto"
        if weighted_metrics == "auto":
            weighted_metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy")]
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )

    def get_metrics_result(self):
        """Keras' metrics, plus `perplexity = exp(loss)` with the default metrics."""
        result = super().get_metrics_result()
        if getattr(self, "_perplexity_from_loss", False) and "loss" in result:
            result["perplexity"] = ops.exp(ops.minimum(result["loss"], PERPLEXITY_LOSS_CAP))
        return result

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Keras' `quantize`, leaving the preprocessor out: its layers hold no
        weights, and Keras refuses to quantize a tokenizer that is not built."""
        from keras.src.quantizers.utils import should_quantize_layer

        preprocessing = set()
        if self.preprocessor is not None:
            preprocessing = {id(layer) for layer in self.preprocessor._flatten_layers()}

        def keep(layer):
            if id(layer) in preprocessing:
                return False
            return filters is None or should_quantize_layer(layer, filters)

        return super().quantize(mode, config=config, filters=keep, **kwargs)

    def score(
        self,
        token_ids,
        padding_mask=None,
        scoring_mode: str = "logits",
        layer_intercept_fn=None,
        target_ids=None,
    ):
        """Per-token logits or losses of given token ids (keras-hub's `score`).

        Used for perplexity and ranking of candidate texts: one forward pass,
        no sampling.

        Args:
            token_ids: int `[batch, num_tokens]`, e.g. a `generate()` output
                run through `preprocessor.generate_preprocess`.
            padding_mask: Optional `[batch, num_tokens]`, 1/True for real
                tokens (padding may be on either side); None = no padding.
            scoring_mode: `"logits"` (`[batch, num_tokens, vocab]`) or
                `"loss"` (`[batch, num_tokens]`, the cross-entropy of
                `target_ids` at each position).
            layer_intercept_fn: Optional `fn(x, index) -> x` applied to the
                activations `[batch, num_tokens, hidden_dim]`: index -1 for
                the embeddings, then `i` for the output of layer `i` (see the
                model's `_score_hidden_states` for which layers it sees).
            target_ids: int `[batch, num_tokens]`, required for `"loss"`
                (usually `token_ids` shifted left by one).

        Returns:
            Logits or per-token losses, as above.
        """
        if scoring_mode not in SCORING_MODES:
            raise ValueError(
                f"`scoring_mode` must be one of {SCORING_MODES}. Received: {scoring_mode!r}"
            )
        if scoring_mode == "loss" and target_ids is None:
            raise ValueError(
                '`scoring_mode="loss"` needs `target_ids` (the token expected at '
                "each position, usually `token_ids` shifted left by one)."
            )
        backbone = self.backbone
        check_model_inputs(
            {"token_ids": token_ids, "padding_mask": padding_mask},
            backbone.vocabulary_size,
            backbone.max_sequence_length,
        )
        if target_ids is not None:
            check_token_ids(target_ids, backbone.vocabulary_size, None, name="target_ids")
        token_ids = ops.convert_to_tensor(token_ids, "int32")
        if padding_mask is None:
            padding_mask = ops.ones_like(token_ids)
        if layer_intercept_fn is None:
            layer_intercept_fn = lambda x, index: x  # noqa: E731
        hidden_states = self._score_hidden_states(
            token_ids, ops.convert_to_tensor(padding_mask), layer_intercept_fn
        )
        logits = backbone.token_embedding(hidden_states, reverse=True)
        if scoring_mode == "logits":
            return logits
        per_token = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        return per_token(ops.convert_to_tensor(target_ids, "int32"), logits)

    def _score_hidden_states(self, token_ids, padding_mask, layer_intercept_fn):
        """Final hidden states for `score`, calling `layer_intercept_fn`."""
        raise NotImplementedError

    def get_compile_config(self):
        """Keras' compile config plus the sampler, so a loaded model generates
        as the saved one did."""
        config = super().get_compile_config()
        if config and getattr(self, "sampler", None) is not None:
            config["sampler"] = keras.saving.serialize_keras_object(self.sampler)
        if config:
            config["perplexity_from_loss"] = getattr(self, "_perplexity_from_loss", False)
        return config

    def compile_from_config(self, config):
        """Compiles a loaded model with its saved optimizer, loss, metrics and
        sampler (Keras skips this for models that override `compile`).

        `jit_compile` is left to resolve on the loading backend: a file saved
        with XLA on JAX must not switch on `torch.compile` under PyTorch.
        """
        config = dict(keras.saving.deserialize_keras_object(config))
        config.pop("jit_compile", None)
        perplexity_from_loss = config.pop("perplexity_from_loss", False)
        self.compile(**config)
        self._perplexity_from_loss = perplexity_from_loss
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
        # keras-hub's own samplers divide the logits by their temperature
        # before the softmax subtracts the largest: at a temperature near the
        # contract's smallest (2**-126) that overflows to inf - inf. Handing
        # them logits whose largest is 0 gives the contract's order (subtract,
        # then divide); `ContractSampler` does it itself.
        shift_logits = not isinstance(self.sampler, ContractSampler)

        def next(prompt, cache, index):
            cache_update_index = index - 1
            batch_size = ops.shape(prompt)[0]
            prompt = ops.slice(prompt, [0, cache_update_index], [batch_size, 1])
            logits, hidden_states, cache = self.call_with_cache(prompt, cache, cache_update_index)
            logits = ops.squeeze(logits, axis=1)
            if shift_logits:
                logits = ops.cast(logits, "float32")
                logits = logits - ops.max(logits, axis=-1, keepdims=True)
            return logits, ops.squeeze(hidden_states, axis=1), cache

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
