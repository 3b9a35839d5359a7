"""Model factory: `primer_ez`, `transformer` and `feedback` from one preset."""

from __future__ import annotations

from keras_primer_runtime.run_config import MODELS


def build_backbone(model: str, preset, vocabulary_size: int, dtype=None):
    """The backbone of `model` sized by `preset` (a `TrainPreset`).

    `primer_ez` is `PrimerBackbone` with its defaults (squared ReLU,
    multi-DConv-head attention); `transformer` is the same code with
    `activation="gelu", use_dconv=False`; `feedback` is
    `FeedbackBackbone` (shared key/value projections, ReLU).

    Raises:
        ValueError: Unknown `model`.
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
        from keras_primer.models.feedback import FeedbackBackbone

        return FeedbackBackbone(**common)
    raise ValueError(f"Unknown model {model!r}. Choose one of: {', '.join(MODELS)}.")


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
        from keras_primer.models.feedback import FeedbackCausalLM

        return FeedbackCausalLM(backbone=backbone, preprocessor=preprocessor)
    return PrimerCausalLM(backbone=backbone, preprocessor=preprocessor)
