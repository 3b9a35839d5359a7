"""The generation contract shared by every runtime (stdlib + NumPy only).

One place says what generation means for keras-primer; Keras `generate`
(`keras_primer.generation`), the SavedModel signatures and the ONNX Runtime
generator (`keras_primer_runtime.ort_generator`) derive from it. Its parts:

* `options`: sampling options (`SamplingOptions`, `check_sampling`, their
  float32 bounds `MIN_TEMPERATURE`, `MAX_TEMPERATURE`, `MIN_TOP_P`), the
  next-token distribution (`filtered_probabilities`) and the length rule
  (`check_max_new_tokens`).
* `prompts`: non-empty prompts under the Unicode rule (`check_prompts`,
  `check_text`, `UNICODE_ERROR`), without special ids among their tokens
  (`check_prompt_tokens`, `SPECIAL_TOKEN_ERROR`).
* `tokenizers`: the tokenizer description that travels with an export
  (`TokenizerSpec`) and the one codec per kind (`ByteCodec`,
  `SentencePieceCodec`, `make_codec`, `load_tokenizer`).
* `loop`: prompt packing, forced prompt tokens, the stop at the end id and
  the post-processing (`loop_bounds`, `decode_position`, `shown_tokens`),
  written once against an array namespace (NumPy in ONNX Runtime,
  `tf.experimental.numpy` in the SavedModel).
* `state`: the decoding-state description a model reports, one `StateSpec`
  per tensor of its cache (place, shape, ONNX name).

Every check raises `ValueError` with the texts built here, so a bad option
reads the same whatever runtime received it.

>>> from keras_primer_runtime import generation
>>> generation.check_sampling(temperature=0.7, top_k=5).top_k
5
"""

from keras_primer_runtime.generation.loop import decode_position, loop_bounds, shown_tokens
from keras_primer_runtime.generation.options import (
    INT32_MAX,
    LENGTH_ERROR,
    MAX_NEW_TOKENS_ERROR,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    SEED_ERROR,
    TEMPERATURE_ERROR,
    TOP_K_ERROR,
    TOP_P_ERROR,
    SamplingOptions,
    check_max_new_tokens,
    check_sampling,
    choose_next,
    filtered_probabilities,
)
from keras_primer_runtime.generation.prompts import (
    EMPTY_PROMPT_ERROR,
    PROMPTS_ERROR,
    SPECIAL_TOKEN_ERROR,
    UNICODE_ERROR,
    check_prompt_tokens,
    check_prompts,
    check_text,
)
from keras_primer_runtime.generation.state import (
    ONNX_PAST_KEY_VALUES,
    StateSpec,
    empty_structure,
    onnx_present_name,
    structure_get,
)
from keras_primer_runtime.generation.tokenizers import (
    END_ID,
    PAD_ID,
    SENTENCEPIECE_FILE,
    START_ID,
    TOKENIZER_FILE,
    TOKENIZER_KINDS,
    UNK_ID,
    ByteCodec,
    SentencePieceCodec,
    TokenizerSpec,
    byte_spec,
    load_tokenizer,
    make_codec,
    prompt_ids,
)
