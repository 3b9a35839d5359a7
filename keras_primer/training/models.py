"""Model factory: `primer_ez`, `transformer` and `feedback` from one preset."""

from __future__ import annotations

import inspect

MODELS = ("primer_ez", "transformer", "feedback")


def _filter_kwargs(cls, kwargs: dict) -> dict:
    """The `kwargs` that `cls.__init__` names (a backbone may lack e.g. `dropout`)."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in kwargs.items() if k in params or k == "dtype"}


def build_backbone(model: str, preset, vocabulary_size: int, dtype=None):
    """The backbone of `model` sized by `preset` (a `TrainPreset`).

    `primer_ez` is `PrimerBackbone` with its defaults (squared ReLU,
    multi-DConv-head attention); `transformer` is the same code with
    `activation="gelu", use_dconv=False`; `feedback` is
    `keras_primer.models.feedback.FeedbackBackbone`, imported only when asked.

    Raises:
        ValueError: Unknown `model`, or `feedback` when its module is missing.
    """
    common = dict(
        vocabulary_size=vocabulary_size,
        num_layers=preset.num_layers,
        num_heads=preset.num_heads,
        hidden_dim=preset.hidden_dim,
        intermediate_dim=preset.intermediate_dim,
        dropout=preset.dropout,
        max_sequence_length=preset.sequence_length,
        dtype=dtype,
    )
    if model in ("primer_ez", "transformer"):
        from keras_primer.models.primer import PrimerBackbone

        if model == "transformer":
            common.update(activation="gelu", use_dconv=False)
        return PrimerBackbone(**common)
    if model == "feedback":
        cls, _ = _feedback_classes()
        return cls(**_filter_kwargs(cls, common))
    raise ValueError(f"Unknown model {model!r}. Choose one of: {', '.join(MODELS)}.")


def _feedback_classes():
    try:
        from keras_primer.models.feedback import FeedbackBackbone, FeedbackCausalLM
    except ImportError as e:
        raise ValueError(
            "`--model feedback` needs keras_primer.models.feedback "
            f"(FeedbackBackbone, FeedbackCausalLM), which cannot be imported: {e}"
        ) from e
    return FeedbackBackbone, FeedbackCausalLM


def feedback_available() -> bool:
    """Whether the Feedback Transformer can be built here."""
    try:
        _feedback_classes()
    except ValueError:
        return False
    return True


def build_causal_lm(model: str, preset, tokenizer, dtype=None):
    """A causal LM (`PrimerCausalLM` or `FeedbackCausalLM`) with a preprocessor.

    Args:
        model: One of `MODELS`.
        preset: A `TrainPreset` (sizes, dropout, context length).
        tokenizer: A keras-hub tokenizer with start/end/pad ids
            (`PrimerTokenizer` or `PrimerSentencePieceTokenizer`).
        dtype: Dtype policy such as `"mixed_bfloat16"` (None: global policy).
    """
    from keras_primer.models.primer import PrimerCausalLM, PrimerCausalLMPreprocessor

    vocabulary_size = int(tokenizer.vocabulary_size())
    backbone = build_backbone(model, preset, vocabulary_size, dtype=dtype)
    preprocessor = PrimerCausalLMPreprocessor(tokenizer, sequence_length=preset.sequence_length)
    if model == "feedback":
        _, cls = _feedback_classes()
        return cls(backbone=backbone, preprocessor=preprocessor)
    return PrimerCausalLM(backbone=backbone, preprocessor=preprocessor)
