"""The model registry's classes: build any registered model, or name a built one.

The registry itself is data, declared once and framework-free in
`keras_primer_cli.model_registry` (so `keras-primer train --help` lists it
without Keras). Here its entries become classes: the causal LM by its
registered Keras name, the backbone and preprocessor the keras-hub way
(`backbone_cls`, `preprocessor_cls` and its `tokenizer_cls`).

>>> from keras_primer import PrimerTokenizer
>>> from keras_primer_cli.presets import get_preset
>>> lm = build_causal_lm("transformer", get_preset("tiny"), PrimerTokenizer())
>>> type(lm).__name__, lm.backbone.use_dconv, model_entry(lm).family
('PrimerCausalLM', False, 'primer')
"""

from __future__ import annotations

import keras

from keras_primer.tokenizers import keras_tokenizer
from keras_primer_cli.model_registry import MODELS, ModelEntry, get_model_entry

__all__ = ["build_backbone", "build_causal_lm", "causal_lm_class", "model_entry"]


def causal_lm_class(entry: ModelEntry) -> type:
    """The causal LM class an entry names (registered with `keras.saving`)."""
    if entry.causal_lm.startswith("keras_hub>"):
        import keras_hub  # noqa: F401  registers keras-hub's classes

    cls = keras.saving.get_registered_object(entry.causal_lm)
    if cls is None:
        raise ValueError(
            f"Model {entry.name!r} names {entry.causal_lm}, which is not a registered Keras "
            "class: import the package that defines it first."
        )
    return cls


def _preprocessor_class(entry: ModelEntry) -> type:
    if entry.preprocessor:
        return keras.saving.get_registered_object(entry.preprocessor)
    return causal_lm_class(entry).preprocessor_cls


def build_backbone(name: str, preset, vocabulary_size: int, dtype=None):
    """The backbone of model `name` sized by `preset` (a `TrainPreset`),
    with the entry's variant switches; random weights, nothing downloaded.

    Raises:
        ValueError: Unknown `name` (the message lists the registry).
    """
    entry = get_model_entry(name)
    return causal_lm_class(entry).backbone_cls(
        vocabulary_size=vocabulary_size,
        num_layers=preset.num_layers,
        num_heads=preset.num_heads,
        hidden_dim=preset.hidden_dim,
        intermediate_dim=preset.intermediate_dim,
        dropout=preset.dropout,
        max_sequence_length=preset.sequence_length,
        dtype=dtype,
        **entry.backbone_args,
    )


def build_causal_lm(name: str, preset, tokenizer_or_codec, dtype=None):
    """Model `name` with its family's own preprocessor, sized by `preset`.

    Args:
        name: A registry name (`keras_primer_cli.model_registry.MODELS`).
        preset: A `TrainPreset` (sizes, dropout, context length).
        tokenizer_or_codec: A keras-hub tokenizer, or a runtime codec
            (`ByteCodec`, `SentencePieceCodec`), which becomes the family's
            byte tokenizer or a `PrimerSentencePieceTokenizer`.
        dtype: Dtype policy such as `"mixed_bfloat16"` (None: global policy).
    """
    entry = get_model_entry(name)
    preprocessor_cls = _preprocessor_class(entry)
    tokenizer = tokenizer_or_codec
    if hasattr(tokenizer_or_codec, "kind"):  # a codec
        tokenizer = keras_tokenizer(tokenizer_or_codec, preprocessor_cls.tokenizer_cls)
    backbone = build_backbone(name, preset, int(tokenizer.vocabulary_size()), dtype=dtype)
    preprocessor = preprocessor_cls(tokenizer, sequence_length=preset.sequence_length)
    return causal_lm_class(entry)(backbone=backbone, preprocessor=preprocessor)


def model_entry(model) -> ModelEntry:
    """The registry entry a built causal LM belongs to (its family and,
    for a family's first entry, the name); `ValueError` for other models.

    Variants of one family share a class, so the entry returned is the
    family's first; read `family` from it, not the variant.
    """
    for entry in MODELS.values():
        try:
            cls = causal_lm_class(entry)
        except ValueError:
            continue
        if isinstance(model, cls):
            return entry
    raise ValueError(
        f"{type(model).__name__} is not a model of the registry: its causal LMs are "
        f"{sorted({entry.causal_lm.split('>')[-1] for entry in MODELS.values()})}."
    )
