"""What every causal LM's `generate` shares: input checks and post-processing."""

import numpy as np
from keras import ops
from keras_hub.src.utils.tensor_utils import any_equal
from keras_hub.tokenizers import ByteTokenizer

from keras_primer.generation.samplers import check_sampler
from keras_primer.utils.validation import check_token_ids, concrete_value
from keras_primer_runtime.generation import check_prompt_tokens, check_prompts


def finish_generation(token_ids, padding_mask, stop_token_ids):
    """Marks everything after the first generated stop token as padding."""
    if stop_token_ids is None:
        return {"token_ids": token_ids, "padding_mask": ops.ones_like(token_ids, dtype="bool")}
    end_locations = ops.cast(
        any_equal(token_ids, stop_token_ids, ops.logical_not(padding_mask)), "int32"
    )
    cumsum = ops.cast(ops.cumsum(end_locations, axis=-1), "int32")
    overflow = cumsum - end_locations
    return {"token_ids": token_ids, "padding_mask": ops.logical_not(ops.cast(overflow, "bool"))}


def check_prompt_rows(padding_mask) -> None:
    """Raises ValueError when a row of `generate`'s `padding_mask` marks no
    token as real: decoding starts after each row's prompt, and a row without
    one has no position to start from (TensorFlow raised a raw
    InvalidArgumentError, PyTorch an IndexError, JAX returned garbage).
    Checked when the mask's values are known now (NumPy, eager tensors)."""
    mask = concrete_value(padding_mask)
    if mask is None or mask.size == 0:
        return
    mask = np.atleast_2d(mask)
    empty = np.flatnonzero(~mask.astype(bool).any(axis=-1))
    if empty.size:
        raise ValueError(
            f"`padding_mask` row {int(empty[0])} marks no token as real (all 0): every row "
            "of `generate`'s token ids must hold at least one prompt token (its start token, "
            "say) marked 1, from which decoding continues. Give that row a prompt or leave it "
            f"out. Rows without a prompt token: {empty.tolist()}."
        )


def _as_prompt_list(inputs):
    if isinstance(inputs, (str, bytes)):
        return [inputs]
    if isinstance(inputs, (list, tuple)) and all(isinstance(x, (str, bytes)) for x in inputs):
        return list(inputs)
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "USO":
        return [x for x in inputs.reshape(-1)]
    return None


class GenerateInputChecks:
    """Mixin for `CausalLM` subclasses: clear errors before `generate`/`fit`.

    Checks that prompts are non-empty, valid Unicode strings (the decoding
    contract's `check_prompts`) whose tokens are not special ids (its
    `check_prompt_tokens`) and that fit in `max_length`, that
    `max_length` fits the backbone, and that token-id inputs (NumPy or eager
    tensors) hold ids inside the vocabulary.
    """

    def _check_features(self, x):
        if isinstance(x, tuple) and x:
            x = x[0]
        if isinstance(x, dict) and "token_ids" in x:
            backbone = self.backbone
            check_token_ids(x["token_ids"], backbone.vocabulary_size, backbone.max_sequence_length)

    def fit(self, x=None, *args, **kwargs):
        self._check_features(x)
        return super().fit(x, *args, **kwargs)

    def evaluate(self, x=None, *args, **kwargs):
        self._check_features(x)
        return super().evaluate(x, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        self._check_features(x)
        return super().predict(x, *args, **kwargs)

    def generate(self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False):
        """keras-hub `generate`, after the decoding contract's checks: the
        sampler's options (`keras_primer.generation.check_sampler`, same
        error texts as the SavedModel and ONNX Runtime), prompts (the
        contract's Unicode rule among them) and lengths."""
        if getattr(self, "sampler", None) is not None:
            check_sampler(self.sampler)
        backbone = self.backbone
        if max_length is not None and (
            isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
        ):
            raise ValueError(f"`max_length` must be an integer. Received: {max_length!r}")
        if max_length is None and self.preprocessor is not None:
            max_length = self.preprocessor.sequence_length
        if max_length is not None and not 1 <= int(max_length) <= backbone.max_sequence_length:
            raise ValueError(
                f"`max_length` must be between 1 and the model's "
                f"max_sequence_length={backbone.max_sequence_length}. "
                f"Received: {max_length}"
            )
        prompts = _as_prompt_list(inputs)
        if prompts is not None and self.preprocessor is not None:
            self._check_prompts(prompts, max_length)
        elif isinstance(inputs, dict):
            self._check_features(inputs)
            check_prompt_rows(inputs.get("padding_mask"))
        return super().generate(
            inputs, max_length=max_length, stop_token_ids=stop_token_ids, strip_prompt=strip_prompt
        )

    def _check_prompts(self, prompts, max_length):
        # Types and emptiness: the decoding contract's check and error texts.
        prompts = check_prompts(list(prompts))
        tokenizer = self.preprocessor.tokenizer
        start = 1 if self.preprocessor.add_start_token else 0
        # The ids keras-hub strips from generated text (the contract's special
        # ids for our tokenizers) must not come from a prompt.
        special_ids = [int(i) for i in getattr(tokenizer, "special_token_ids", ())]
        kind = "bytes" if isinstance(tokenizer, ByteTokenizer) else "sentencepiece"
        for i, prompt in enumerate(prompts):
            ids = np.asarray(tokenizer(prompt)).reshape(-1)
            check_prompt_tokens(prompt, ids, special_ids, kind, i if len(prompts) > 1 else None)
            num_tokens = len(ids) + start
            if max_length is not None and num_tokens > max_length:
                raise ValueError(
                    f"Prompt {i} is {num_tokens} tokens long (start token included), "
                    f"more than max_length={max_length}. Shorten the prompt or raise "
                    "`max_length`; prompts are never truncated silently."
                )
