"""The model registry: every model `keras-primer` builds, declared once (stdlib only).

An entry is a name (the `--model` choice), the registered Keras name of its
family's causal LM class, and the switches that make the variant (keyword
arguments of the family's backbone, beside the preset's sizes). The causal
LM class brings the rest the keras-hub way: `backbone_cls`,
`preprocessor_cls` and its `tokenizer_cls`. The command line reads the
names from here without importing Keras; the trainer, the comparison, the
exporters and the tests resolve the classes with
`keras_primer.models.registry`.

A new variant is one entry. A new family is its model folder (backbone,
causal LM, preprocessor, registered with `keras.saving`) plus one entry.

>>> dict(MODELS["transformer"].backbone_args)
{'activation': 'gelu', 'use_dconv': False}
>>> sorted(TRAINABLE_MODELS) == sorted(set(MODELS) - {"gpt2"})
True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class ModelEntry:
    """One model of the registry.

    Attributes:
        name: The `--model` choice and the name written into run folders.
        family: The family written into export metadata (`primer`,
            `feedback`); entries of one family share `causal_lm`.
        causal_lm: Registered Keras name of the causal LM class
            (`"keras_primer>PrimerCausalLM"`).
        description: One line for `--help`.
        backbone_args: The variant's backbone keyword arguments.
        preprocessor: Registered Keras name of a preprocessor to use instead
            of the class's own `preprocessor_cls` (the reference model reads
            our tokenizers' ids).
        reference: A model of someone else's library that `recipes.compare`
            measures ours against: not a `--model` choice, never exported.
    """

    name: str
    family: str
    causal_lm: str
    description: str
    backbone_args: dict = field(default_factory=dict)
    preprocessor: str | None = None
    reference: bool = False

    def __post_init__(self):
        # Read-only: one entry is shared by every caller of the registry.
        object.__setattr__(self, "backbone_args", MappingProxyType(dict(self.backbone_args)))

    @property
    def exportable(self) -> bool:
        return not self.reference


def _entries(*entries: ModelEntry) -> dict[str, ModelEntry]:
    return {entry.name: entry for entry in entries}


MODELS: dict[str, ModelEntry] = _entries(
    ModelEntry(
        "primer_ez",
        "primer",
        "keras_primer>PrimerCausalLM",
        "Primer EZ (squared ReLU, multi-DConv-head attention)",
    ),
    ModelEntry(
        "transformer",
        "primer",
        "keras_primer>PrimerCausalLM",
        "the Transformer baseline (GELU, plain attention)",
        {"activation": "gelu", "use_dconv": False},
    ),
    ModelEntry(
        "feedback",
        "feedback",
        "keras_primer>FeedbackCausalLM",
        "Feedback Transformer, shared key/value projections",
    ),
    ModelEntry(
        "feedback_primer_ez",
        "feedback",
        "keras_primer>FeedbackCausalLM",
        "Feedback Transformer with Primer EZ's squared ReLU and depthwise convolutions",
        {"activation": "squared_relu", "use_dconv": True},
    ),
    ModelEntry(
        "gpt2",
        "gpt2",
        "keras_hub>GPT2CausalLM",
        "keras-hub's GPT-2 of the preset's size (random weights), the reference",
        preprocessor="keras_primer>PrimerCausalLMPreprocessor",
        reference=True,
    ),
)

#: The `keras-primer train --model` choices (the reference is library-only).
TRAINABLE_MODELS: dict[str, ModelEntry] = {
    name: entry for name, entry in MODELS.items() if not entry.reference
}


def get_model_entry(name: str) -> ModelEntry:
    """The entry called `name`; `ValueError` naming the choices otherwise.

    >>> get_model_entry("feedback").family
    'feedback'
    """
    if name not in MODELS:
        raise ValueError(f"Unknown model {name!r}. Choose one of: {', '.join(MODELS)}.")
    return MODELS[name]
