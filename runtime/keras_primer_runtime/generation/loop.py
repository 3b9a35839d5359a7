"""The decoding loop of the generation contract, written once for any array namespace."""

from __future__ import annotations

from keras_primer_runtime.generation.tokenizers import TokenizerSpec

# One description of the loop, written against an array namespace `xp`:
# NumPy in the ONNX Runtime generator, `tf.experimental.numpy` inside the
# SavedModel's `tf.while_loop`. Each prompt row is right-padded with the pad
# id to `max(lengths) + max_new_tokens`; the model runs the shortest prompt
# in one step, then one position at a time; at a position still inside a
# row's prompt the prompt's own token is kept (forced), after it the sampled
# one; a row is done at its first generated end id or at its limit
# (`length + max_new_tokens`); the loop stops when every row is done.


def loop_bounds(xp, lengths, max_new_tokens):
    """`(limits, total, start)`: each row's last position + 1, the padded
    width and the first position the loop decodes."""
    limits = lengths + max_new_tokens
    return limits, xp.max(lengths) + max_new_tokens, xp.min(lengths)


def decode_position(xp, position, chosen, tokens, positions, lengths, limits, done, end_id):
    """Writes position `position` of every row; returns `(token, tokens, done)`.

    `chosen` are the sampled ids `[batch]`, `positions` is `arange(total)[None]`.
    """
    in_prompt = position < lengths
    token = xp.where(in_prompt, xp.take(tokens, position, axis=1), chosen)
    tokens = xp.where(positions == position, token[:, None], tokens)
    ended = xp.logical_and(xp.logical_not(in_prompt), token == end_id)
    done = xp.logical_or(xp.logical_or(done, ended), position + 1 >= limits)
    return token, tokens, done


def shown_tokens(xp, tokens, positions, lengths, limits, spec: TokenizerSpec):
    """Post-processing: `(visible, shown, generated)` masks `[batch, total]`.

    `visible`: each row's prompt and new tokens up to (and with) its first
    generated end id, a prefix of the row (the token ids a runtime returns);
    `shown`: `visible` without special ids (the text's ids); `generated`:
    positions after the prompt (`shown & generated` is the completion).
    """
    valid = positions < limits[:, None]
    generated = positions >= lengths[:, None]
    ends = xp.where(xp.logical_and(xp.logical_and(generated, valid), tokens == spec.end_id), 1, 0)
    after_end = (xp.cumsum(ends, axis=1) - ends) > 0
    visible = xp.logical_and(valid, xp.logical_not(after_end))
    shown = visible
    for special in spec.special_ids:
        shown = xp.logical_and(shown, tokens != special)
    return visible, shown, generated
