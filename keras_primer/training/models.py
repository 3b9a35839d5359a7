"""Model factory: `primer_ez`, `transformer`, `feedback` and
`feedback_primer_ez` (and keras-hub's
`gpt2`, the reference of `recipes.compare`) from one preset."""

from __future__ import annotations

from keras_primer_runtime.run_config import MODELS, REFERENCE_MODELS

# The models built on `FeedbackBackbone` / `FeedbackCausalLM`.
FEEDBACK_MODELS = ("feedback", "feedback_primer_ez")


def build_backbone(model: str, preset, vocabulary_size: int, dtype=None):
    """The backbone of `model` sized by `preset` (a `TrainPreset`).

    `primer_ez` is `PrimerBackbone` with its defaults (squared ReLU,
    multi-DConv-head attention); `transformer` is the same code with
    `activation="gelu", use_dconv=False`; `feedback` is
    `FeedbackBackbone` (shared key/value projections, ReLU);
    `feedback_primer_ez` is the same with Primer EZ's two changes (squared
    ReLU, causal depthwise convolutions on queries and memory); `gpt2` is
    keras-hub's `GPT2Backbone` of the same size (random weights, nothing
    downloaded), the model a Keras user would otherwise train.

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
    if model in FEEDBACK_MODELS:
        from keras_primer.models.feedback import FeedbackBackbone

        if model == "feedback_primer_ez":
            common.update(activation="squared_relu", use_dconv=True)
        return FeedbackBackbone(**common)
    if model == "gpt2":
        import keras_hub

        return keras_hub.models.GPT2Backbone(**common)
    raise ValueError(
        f"Unknown model {model!r}. Choose one of: {', '.join(MODELS + REFERENCE_MODELS)}."
    )


def build_causal_lm(model: str, preset, tokenizer, dtype=None):
    """A causal LM (`PrimerCausalLM`, `FeedbackCausalLM`, or keras-hub's
    `GPT2CausalLM` for `gpt2`) with our preprocessor, so every model reads the
    same token ids.

    Args:
        model: One of `MODELS` or `REFERENCE_MODELS`.
        preset: A `TrainPreset` (sizes, dropout, context length).
        tokenizer: A keras-hub tokenizer with start/end/pad ids
            (`PrimerTokenizer` or `PrimerSentencePieceTokenizer`).
        dtype: Dtype policy such as `"mixed_bfloat16"` (None: global policy).
    """
    from keras_primer.models.primer import PrimerCausalLM, PrimerCausalLMPreprocessor

    vocabulary_size = int(tokenizer.vocabulary_size())
    backbone = build_backbone(model, preset, vocabulary_size, dtype=dtype)
    preprocessor = PrimerCausalLMPreprocessor(tokenizer, sequence_length=preset.sequence_length)
    if model in FEEDBACK_MODELS:
        from keras_primer.models.feedback import FeedbackCausalLM

        return FeedbackCausalLM(backbone=backbone, preprocessor=preprocessor)
    if model == "gpt2":
        import keras_hub

        return keras_hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    return PrimerCausalLM(backbone=backbone, preprocessor=preprocessor)
