"""keras-hub's own test harness on every public model class, and Keras'
`run_layer_test` on every public layer, on every backend.

Where a harness check cannot apply it is switched off at the call with the
reason beside it. Configs are tiny so the whole file stays fast.
"""

import os

import numpy as np
from keras.src.testing import TestCase as KerasTestCase
from keras_hub.src.tests import test_case as hub_test_case  # needs `grain`

import keras_primer  # noqa: F401  (registers the serializable classes)
from keras_primer.layers import CausalDepthwiseConv, FeedForward
from keras_primer.layers.position_embedding import PaddingAwarePositionEmbedding
from keras_primer.models.feedback import (
    FeedbackAttention,
    FeedbackBackbone,
    FeedbackCausalLM,
    FeedbackCausalLMPreprocessor,
    FeedbackStack,
)
from keras_primer.models.primer import (
    MultiDConvHeadAttention,
    PrimerBackbone,
    PrimerCausalLM,
    PrimerCausalLMPreprocessor,
    PrimerDecoderBlock,
)
from keras_primer.tokenizers import FeedbackTokenizer, PrimerTokenizer


class TestCase(hub_test_case.TestCase):
    # tf.test.TestCase's deprecated `test_session` would be collected by
    # pytest as a test that always skips ("Not a test").
    test_session = None


SEQ = 8
COMMON = dict(
    vocabulary_size=256,
    num_layers=2,
    num_heads=2,
    hidden_dim=8,
    intermediate_dim=16,
    max_sequence_length=16,
)
FAMILIES = {
    "primer": (
        PrimerBackbone,
        PrimerCausalLM,
        PrimerCausalLMPreprocessor,
        PrimerTokenizer,
        dict(COMMON),
    ),
    "feedback": (
        FeedbackBackbone,
        FeedbackCausalLM,
        FeedbackCausalLMPreprocessor,
        FeedbackTokenizer,
        dict(COMMON, activation="squared_relu"),
    ),
}


def _backbone_inputs():
    mask = np.ones((2, SEQ), "int32")
    mask[1, 5:] = 0
    return {
        "token_ids": np.arange(2 * SEQ, dtype="int32").reshape(2, SEQ) % 256,
        "padding_mask": mask,
    }


class BackboneHarnessTest(TestCase):
    def _run(self, family):
        backbone_cls, _, _, _, kwargs = FAMILIES[family]
        self.run_backbone_test(
            cls=backbone_cls,
            init_kwargs=kwargs,
            input_data=_backbone_inputs(),
            expected_output_shape=(2, SEQ, kwargs["hidden_dim"]),
        )

    def test_primer_backbone(self):
        self._run("primer")

    def test_feedback_backbone(self):
        self._run("feedback")

    def test_primer_backbone_saving(self):
        self.run_model_saving_test(
            cls=PrimerBackbone, init_kwargs=FAMILIES["primer"][4], input_data=_backbone_inputs()
        )

    def test_feedback_backbone_saving(self):
        self.run_model_saving_test(
            cls=FeedbackBackbone,
            init_kwargs=FAMILIES["feedback"][4],
            input_data=_backbone_inputs(),
        )


class TaskHarnessTest(TestCase):
    def _task_kwargs(self, family):
        backbone_cls, _, preprocessor_cls, tokenizer_cls, kwargs = FAMILIES[family]
        return {
            "backbone": backbone_cls(**kwargs),
            "preprocessor": preprocessor_cls(tokenizer_cls(), sequence_length=SEQ),
        }

    def _run(self, family):
        _, task_cls, _, _, kwargs = FAMILIES[family]
        self.run_task_test(
            cls=task_cls,
            init_kwargs=self._task_kwargs(family),
            train_data=(["the quick", "brown fox"],),
            expected_output_shape=(2, SEQ, kwargs["vocabulary_size"]),
        )

    def test_primer_causal_lm(self):
        self._run("primer")

    def test_feedback_causal_lm(self):
        self._run("feedback")

    def _saving(self, family):
        _, task_cls, _, _, _ = FAMILIES[family]
        init_kwargs = self._task_kwargs(family)
        # The harness calls the model on preprocessed inputs (a dict of
        # tensors), so the task is saved without its string preprocessor.
        init_kwargs["preprocessor"] = None
        self.run_model_saving_test(
            cls=task_cls, init_kwargs=init_kwargs, input_data=_backbone_inputs()
        )

    def test_primer_causal_lm_saving(self):
        self._saving("primer")

    def test_feedback_causal_lm_saving(self):
        self._saving("feedback")

    def _preset(self, family):
        backbone_cls, task_cls, preprocessor_cls, tokenizer_cls, kwargs = FAMILIES[family]
        task = task_cls(**self._task_kwargs(family))
        preset = os.path.join(self.get_temp_dir(), family)
        # keras-hub's presets are downloads; a local preset directory is the
        # offline equivalent and goes through the same loader.
        task.save_to_preset(preset)
        self.run_preset_test(
            cls=backbone_cls,
            preset=preset,
            input_data=_backbone_inputs(),
            expected_output_shape=(2, SEQ, kwargs["hidden_dim"]),
        )
        self.run_preset_test(
            cls=task_cls,
            preset=preset,
            input_data=_backbone_inputs(),
            init_kwargs={"preprocessor": None},
            expected_output_shape=(2, SEQ, kwargs["vocabulary_size"]),
        )
        self.run_preset_test(
            cls=preprocessor_cls,
            preset=preset,
            input_data=(["the quick"],),
        )

    def test_primer_preset(self):
        self._preset("primer")

    def test_feedback_preset(self):
        self._preset("feedback")


class PreprocessorHarnessTest(TestCase):
    def _run(self, preprocessor_cls, tokenizer_cls):
        # keras-hub's harness reads `self.init_kwargs` (its tests set it in
        # setUp) besides the argument.
        self.init_kwargs = {"tokenizer": tokenizer_cls(), "sequence_length": 6}
        self.run_preprocessor_test(
            cls=preprocessor_cls,
            init_kwargs=self.init_kwargs,
            input_data=["Hi!"],
            expected_output=(
                {"token_ids": [[2, 72, 105, 33, 3, 0]], "padding_mask": [[1, 1, 1, 1, 1, 0]]},
                [[72, 105, 33, 3, 0, 0]],
                [[1, 1, 1, 1, 0, 0]],
            ),
        )

    def test_primer_preprocessor(self):
        self._run(PrimerCausalLMPreprocessor, PrimerTokenizer)

    def test_feedback_preprocessor(self):
        self._run(FeedbackCausalLMPreprocessor, FeedbackTokenizer)

    def test_tokenizers(self):
        for tokenizer_cls in (PrimerTokenizer, FeedbackTokenizer):
            self.run_preprocessing_layer_test(
                cls=tokenizer_cls,
                init_kwargs={},
                input_data=["Hi!", "ab"],
                expected_output=[[72, 105, 33], [97, 98]],
            )

    def test_sentencepiece_tokenizer(self):
        import sentencepiece as spm

        from keras_primer.data import train_sentencepiece
        from keras_primer.tokenizers import PrimerSentencePieceTokenizer

        sonnets = os.path.join(os.path.dirname(__file__), "data", "sonnets.txt")
        proto = train_sentencepiece([sonnets], vocabulary_size=400).proto
        texts = ["Shall I compare thee", "to a summer's day?"]
        # The oracle: the sentencepiece library itself on the same proto.
        expected = spm.SentencePieceProcessor(model_proto=proto).encode(texts)
        self.run_preprocessing_layer_test(
            cls=PrimerSentencePieceTokenizer,
            init_kwargs={"proto": proto},
            input_data=texts,
            expected_output=expected,
        )


class LayerHarnessTest(KerasTestCase):
    """Keras' `run_layer_test`. The mixed-precision check is Keras' own; on
    torch CPU Keras skips float16 itself."""

    def test_causal_depthwise_conv(self):
        self.run_layer_test(
            CausalDepthwiseConv,
            {"kernel_size": 3},
            input_shape=(2, 5, 2, 4),
            expected_output_shape=(2, 5, 2, 4),
            expected_num_trainable_weights=1,
        )

    def test_feed_forward(self):
        self.run_layer_test(
            FeedForward,
            {"intermediate_dim": 16, "activation": "squared_relu"},
            input_shape=(2, 5, 8),
            expected_output_shape=(2, 5, 8),
            expected_num_trainable_weights=4,
            supports_masking=True,
        )

    def test_multi_dconv_head_attention(self):
        self.run_layer_test(
            MultiDConvHeadAttention,
            {"num_heads": 2, "key_dim": 4},
            input_shape=(2, 5, 8),
            expected_output_shape=(2, 5, 8),
            expected_num_trainable_weights=11,
            supports_masking=True,
        )

    def test_primer_decoder_block(self):
        self.run_layer_test(
            PrimerDecoderBlock,
            {"num_heads": 2, "intermediate_dim": 16, "dropout": 0.1},
            input_shape=(2, 5, 8),
            expected_output_shape=(2, 5, 8),
            expected_num_trainable_weights=19,
            expected_num_seed_generators=3,
            supports_masking=True,
        )

    def test_position_embedding(self):
        self.run_layer_test(
            PaddingAwarePositionEmbedding,
            {"sequence_length": 8},
            input_shape=(2, 5, 4),
            expected_output_shape=(2, 5, 4),
            expected_num_trainable_weights=1,
        )

    def test_feedback_stack(self):
        self.run_layer_test(
            FeedbackStack,
            {
                "num_layers": 2,
                "num_heads": 2,
                "intermediate_dim": 16,
                "max_sequence_length": 8,
                "dropout": 0.1,
            },
            input_shape=(2, 5, 8),
            expected_output_shape=(2, 5, 8),
            expected_num_trainable_weights=2 * (4 + 6 + 4) + 3,
            expected_num_seed_generators=1,
        )


class MultiInputLayerHarnessTest(TestCase):
    """keras-hub's `run_layer_test` for the layer with several call inputs:
    Keras' version builds such layers with `build(query=...)`, keras-hub's
    with `build(query_shape=...)`, the Keras convention for shapes."""

    def test_feedback_attention(self):
        rng = np.random.default_rng(0)
        self.run_layer_test(
            cls=FeedbackAttention,
            init_kwargs={"num_heads": 2, "key_dim": 4, "max_relative_distance": 6},
            input_data={
                "query": rng.normal(size=(2, 8)).astype("float32"),
                "keys": rng.normal(size=(2, 3, 2, 4)).astype("float32"),
                "values": rng.normal(size=(2, 3, 2, 4)).astype("float32"),
                "relative_index": np.array([2, 1, 0], "int32"),
                "attention_mask": np.ones((2, 3), "bool"),
            },
            expected_output_shape=(2, 8),
            expected_num_trainable_weights=6,
            # `relative_index` is one row per memory slot, not per sample, so
            # the harness' `fit` cannot batch it; training is covered by the
            # stack's harness test and the gradient tests.
            run_training_check=False,
            # Keras' symbolic `compute_output_spec` drops the first input
            # when every input is passed by keyword, as this harness does;
            # mixed precision is checked through the stack and the backbone.
            run_precision_checks=False,
        )
