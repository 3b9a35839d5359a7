"""The TensorFlow functions behind the SavedModel's signatures.

`GenerationGraph` holds, for one exported model (`adapters.CausalLMAdapter`),
what `serving_default`, `generate` and `generate_with_options` compute: the
input checks as graph asserts with the generation contract's texts, in-graph
tokenization (core ops for bytes, tensorflow-text's SentencePiece ops), the
contract's decoding loop (`keras_primer_runtime.generation`: `loop_bounds`,
`decode_position`, `shown_tokens`, run with `tf.experimental.numpy`) with the
next token chosen as Keras does (`keras_primer.generation.
filtered_probabilities`), and detokenization. `saved_model.build_module`
traces them into signatures.
"""

import contextlib

import tensorflow as tf
import tensorflow.experimental.numpy as tnp

from keras_primer.generation import filtered_probabilities
from keras_primer.layers.cache_utils import growing_cache_writes
from keras_primer_runtime import generation


def _byte_table():
    return tf.constant([bytes([i]) for i in range(256)])


def _valid_utf8(text):
    return tf.strings.unicode_transcode(
        text, "UTF-8", "UTF-8", errors="replace", replacement_char=0xFFFD
    )


def _assert(condition, message):
    return tf.debugging.Assert(condition, [message])


class GenerationGraph:
    """The TensorFlow functions behind the signatures, for one adapter.

    `sentencepiece` is a `tensorflow_text.SentencepieceTokenizer` for
    SentencePiece models (None for byte models).
    """

    def __init__(self, adapter, default_max_new_tokens=32, sentencepiece=None, xla=False):
        self.adapter = adapter
        self.spec = adapter.tokenizer
        self.sentencepiece = sentencepiece
        self.xla = bool(xla)
        # With `xla`, the numeric loop is one XLA computation (the strings
        # around it cannot be compiled).
        self.decode = (
            tf.function(self._decode, jit_compile=True, autograph=False) if xla else self._decode
        )
        limit = adapter.max_sequence_length - (2 if self.spec.add_start_token else 1)
        if (
            isinstance(default_max_new_tokens, bool)
            or not 1 <= int(default_max_new_tokens) <= limit
        ):
            raise ValueError(
                f"`default_max_new_tokens` must be between 1 and {limit} for a model "
                f"with max_sequence_length={adapter.max_sequence_length}. "
                f"Received: {default_max_new_tokens}"
            )
        self.default_max_new_tokens = int(default_max_new_tokens)

    # === serving_default ===
    def logits(self, token_ids, padding_mask):
        a = self.adapter
        shape = tf.shape(token_ids)
        checks = [
            tf.debugging.assert_equal(
                tf.shape(padding_mask),
                shape,
                message="`padding_mask` must have the shape of `token_ids` [batch, length].",
            ),
            tf.debugging.assert_positive(
                shape[1], message="`token_ids` must hold at least one token."
            ),
            tf.debugging.assert_less_equal(
                shape[1],
                a.max_sequence_length,
                message=f"`token_ids` is longer than the model's max_sequence_length={a.max_sequence_length}.",
            ),
            tf.debugging.assert_non_negative(
                token_ids, message="`token_ids` contains a negative id."
            ),
            tf.debugging.assert_less(
                token_ids,
                a.vocabulary_size,
                message=f"`token_ids` contains an id >= vocabulary_size={a.vocabulary_size}.",
            ),
        ]
        with tf.control_dependencies(checks):
            token_ids = tf.identity(token_ids)
            padding_mask = tf.identity(padding_mask)
        logits = a.logits(token_ids, padding_mask)
        return {"logits": tf.cast(logits, tf.float32)}

    # === generate ===
    def tokenize(self, prompts):
        if self.sentencepiece is not None:
            ids = tf.cast(self.sentencepiece.tokenize(prompts), tf.int32)
        else:
            pieces = tf.strings.bytes_split(prompts)
            ids = tf.ragged.map_flat_values(tf.io.decode_raw, pieces, tf.uint8)
            ids = tf.cast(tf.squeeze(ids, -1), tf.int32)
        # The contract's rule (`generation.check_prompt_tokens`): no special
        # id among a prompt's tokens (the text would lose it); the error
        # names the (prompt, token) positions.
        special = tf.reduce_any(
            tf.equal(ids.flat_values[:, None], tf.constant(self.spec.special_ids)), axis=-1
        )
        special = ids.with_flat_values(special).to_tensor(default_value=False)
        check = tf.debugging.Assert(
            tf.logical_not(tf.reduce_any(special)),
            [generation.SPECIAL_TOKEN_ERROR, "(prompt, token) positions:", tf.where(special)],
        )
        with tf.control_dependencies([check]):
            ids = tf.identity(ids)
        if self.spec.add_start_token:
            starts = tf.RaggedTensor.from_tensor(
                tf.fill([tf.shape(prompts)[0], 1], self.spec.start_id)
            )
            ids = tf.concat([starts, ids], axis=1)
        return ids

    def detokenize(self, token_ids, keep):
        ids = tf.ragged.boolean_mask(token_ids, keep)
        if self.sentencepiece is not None:
            return self.sentencepiece.detokenize(ids)
        # Generated bytes need not form UTF-8: shown as U+FFFD, as in Keras.
        return _valid_utf8(tf.strings.reduce_join(tf.gather(_byte_table(), ids), axis=-1))

    @staticmethod
    def option_checks(temperature, top_k, top_p, seed):
        """The contract's option checks as graph asserts (same texts).

        The lower float32 bounds (`generation.MIN_TEMPERATURE`, `MIN_TOP_P`:
        2**-126) are checked on the bits: TensorFlow's CPU kernels read a
        subnormal float32 as 0, so `1e-40 > 0` is False in the graph.
        """
        finite = lambda x: tf.reduce_all(tf.math.is_finite(x))  # noqa: E731

        def magnitude(x):
            # |x| as its bits: 0 for +-0, at least 2**-126's bits when normal.
            return tf.bitwise.bitwise_and(tf.bitcast(x, tf.int32), 0x7FFFFFFF)

        def at_least(x, bound):
            return magnitude(x) >= magnitude(tf.constant(bound, tf.float32))

        in_range = tf.logical_and(temperature >= 0, temperature <= generation.MAX_TEMPERATURE)
        zero_or_normal = tf.logical_or(
            tf.equal(magnitude(temperature), 0), at_least(temperature, generation.MIN_TEMPERATURE)
        )
        temperature_ok = tf.logical_and(
            tf.logical_and(finite(temperature), in_range), zero_or_normal
        )
        top_p_ok = tf.logical_and(
            tf.logical_and(top_p > 0, top_p <= 1), at_least(top_p, generation.MIN_TOP_P)
        )
        return [
            _assert(temperature_ok, generation.TEMPERATURE_ERROR),
            _assert(top_k >= 0, generation.TOP_K_ERROR),
            _assert(top_p_ok, generation.TOP_P_ERROR),
            _assert(seed >= 0, generation.SEED_ERROR),
        ]

    def choose(self, logits, options, step):
        """Next ids from `[batch, vocab]` logits: greedy or sampled."""
        logits = tf.cast(logits, tf.float32)
        greedy = tf.argmax(logits, axis=-1, output_type=tf.int32)
        if options is None:
            return greedy
        temperature, top_k, top_p, seed = options

        def sample():
            # Any accepted temperature is used as given, down to 2**-126.
            probabilities = filtered_probabilities(logits, temperature, top_k, top_p)
            choice = tf.random.stateless_categorical(
                tf.math.log(probabilities), 1, seed=tf.stack([seed, step]), dtype=tf.int32
            )
            return choice[:, 0]

        # A branch, not a `where`: greedy requests (temperature 0) skip the
        # sort and softmax over the vocabulary at every step.
        return tf.cond(temperature > 0, sample, lambda: greedy)

    def _decode(self, tokens, lengths, max_new_tokens, options):
        """The decoding loop on token ids: `tokens` `[batch, total]` (each
        row's prompt, right-padded) with the new tokens written in.

        Portable graphs carry a state that grows by each step's tokens
        (`growing_cache_writes`): a step reads and copies the tokens so far,
        not a buffer of `total`. XLA needs fixed shapes: with `xla` the state
        is one buffer of `total` positions, the prompt block is prefilled as
        Keras `generate` does (`prefill`, then the last shared prompt position
        as a first step), and rows are written in place.
        """
        a, spec = self.adapter, self.spec
        batch_size = tf.shape(lengths)[0]
        limits, total, start = generation.loop_bounds(tnp, lengths, max_new_tokens)
        growing = contextlib.nullcontext if self.xla else growing_cache_writes
        if self.xla:
            state = a.prefill(tokens, start - 1)
            first = tf.slice(tokens, [0, start - 1], [batch_size, 1])
            logits, state = a.step(first, state, start - 1)
        else:
            with growing():
                logits, state = a.step(tokens[:, :start], a.empty_state(batch_size, 0), 0)
        positions = tf.range(total)[None, :]

        def cond(p, tokens, state, last_logits, done):
            return tf.logical_and(p < total, tf.logical_not(tf.reduce_all(done)))

        def body(p, tokens, state, last_logits, done):
            chosen = self.choose(last_logits, options, p)
            token, tokens, done = generation.decode_position(
                tnp, p, chosen, tokens, positions, lengths, limits, done, spec.end_id
            )
            with growing():
                logits, state = a.step(token[:, None], state, p)
            return p + 1, tokens, state, logits[:, -1], done

        loop_vars = (start, tokens, state, logits[:, -1], tf.zeros([batch_size], tf.bool))
        invariants = None
        if not self.xla:
            any_shape = lambda x: tf.TensorShape([None] * x.shape.rank)  # noqa: E731
            invariants = tf.nest.map_structure(any_shape, loop_vars)
        _, tokens, _, _, _ = tf.while_loop(
            cond,
            body,
            loop_vars,
            shape_invariants=invariants,
            maximum_iterations=total - start,
        )
        return tokens

    def generate(self, prompts, max_new_tokens, options=None):
        a, spec = self.adapter, self.spec
        prompts = tf.convert_to_tensor(prompts)
        checks = [
            tf.debugging.assert_equal(
                tf.rank(prompts), 1, message="`prompts` must be a 1-D batch of strings."
            ),
            _assert(tf.size(prompts) > 0, generation.PROMPTS_ERROR),
            _assert(
                tf.reduce_all(tf.strings.length(prompts, unit="BYTE") > 0),
                generation.EMPTY_PROMPT_ERROR,
            ),
            _assert(max_new_tokens >= 1, generation.MAX_NEW_TOKENS_ERROR),
            # The contract's Unicode rule: a valid UTF-8 prompt transcodes to
            # itself; invalid bytes (encoded surrogates too) would be replaced.
            _assert(
                tf.reduce_all(tf.equal(_valid_utf8(prompts), prompts)), generation.UNICODE_ERROR
            ),
        ]
        if options is not None:
            checks += self.option_checks(*options)
        with tf.control_dependencies(checks):
            prompts = tf.identity(prompts)
        ids = self.tokenize(prompts)
        # int64: `max_new_tokens` near 2**31 must not wrap around.
        needed = ids.row_lengths() + tf.cast(max_new_tokens, tf.int64)
        length_error = generation.LENGTH_ERROR.format(max_sequence_length=a.max_sequence_length)
        with tf.control_dependencies(
            [_assert(tf.reduce_all(needed <= a.max_sequence_length), length_error)]
        ):
            lengths = tf.cast(ids.row_lengths(), tf.int32)
            max_new_tokens = tf.identity(tf.cast(max_new_tokens, tf.int32))
        # The contract's loop (`generation.loop_bounds`, `decode_position`,
        # `shown_tokens`), written once for NumPy and `tf.experimental.numpy`.
        limits, total, _ = generation.loop_bounds(tnp, lengths, max_new_tokens)
        tokens = ids.to_tensor(default_value=spec.pad_id)
        tokens = tf.pad(tokens, [[0, 0], [0, max_new_tokens]], constant_values=spec.pad_id)
        tokens = self.decode(tokens, lengths, max_new_tokens, options)
        positions = tf.range(total)[None, :]
        visible, shown, generated = generation.shown_tokens(
            tnp, tokens, positions, lengths, limits, spec
        )
        return {
            "outputs": self.detokenize(tokens, shown),
            "completions": self.detokenize(tokens, shown & generated),
            "num_new_tokens": tf.reduce_sum(tf.cast(generated & visible, tf.int32), axis=1),
        }
