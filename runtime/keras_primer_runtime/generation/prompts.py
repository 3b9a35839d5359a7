"""Prompts of the generation contract: non-empty strings under the Unicode rule.

A prompt must be valid Unicode text: `bytes` must be valid UTF-8, a `str`
must hold no lone surrogate (U+D800 to U+DFFF). Anything else is refused with
`ValueError` (the SavedModel: `InvalidArgumentError`) carrying
`UNICODE_ERROR`, in every runtime and for both tokenizers; nothing is
replaced or dropped silently. Generated ids that do not form valid UTF-8 (a
byte model may emit any byte) are shown as U+FFFD.

A prompt's tokens must not be special ids (`check_prompt_tokens`,
`SPECIAL_TOKEN_ERROR`): decoded text leaves special ids out, so such a
character would vanish from the output. With the byte tokenizer these are the
characters U+0000 (pad), U+0002 (start) and U+0003 (end). A SentencePiece
model's `<pad>`, `<s>` and `</s>` are control pieces, which its encoding never
produces (a NUL there is the byte piece `<0x00>`), so its prompts never hit
this rule.
"""

from __future__ import annotations

from keras_primer_runtime.generation.options import _received

PROMPTS_ERROR = "`prompts` must be a non-empty string or a non-empty list of strings."
EMPTY_PROMPT_ERROR = "Every prompt must be a non-empty string (a prompt is empty)."
UNICODE_ERROR = (
    "Every prompt must be valid Unicode text: UTF-8 bytes, or a str without lone "
    "surrogates (U+D800 to U+DFFF); nothing is replaced silently."
)


SPECIAL_TOKEN_ERROR = (
    "Every prompt must be text whose tokens are not special ids (the byte tokenizer "
    "reserves U+0000 for pad, U+0002 for start and U+0003 for end): decoded text leaves "
    "special ids out, so the character would be dropped silently. Remove or replace it."
)


def check_prompt_tokens(prompt: str, ids, special_ids, kind: str = "bytes", index=None) -> None:
    r"""Raises `ValueError(SPECIAL_TOKEN_ERROR ...)` when a prompt's token ids
    (without the start id a runtime adds) hold a special id, naming it and
    where: the character and its position for the byte tokenizer (`kind`
    "bytes": the ids are the prompt's UTF-8 bytes), else the token position.

    >>> check_prompt_tokens("ab", [97, 98], [0, 2, 3])
    >>> check_prompt_tokens("a\x00b", [97, 0, 98], [0, 2, 3])
    Traceback (most recent call last):
    ...
    ValueError: Every prompt must be text whose tokens are not special ids (the byte tokenizer reserves U+0000 for pad, U+0002 for start and U+0003 for end): decoded text leaves special ids out, so the character would be dropped silently. Remove or replace it. Received: 'a\x00b' (U+0000 at character 1 is the special id 0)
    """
    special = {int(i) for i in special_ids}
    for position, token in enumerate(int(i) for i in ids):
        if token not in special:
            continue
        where = "" if index is None else f"prompt {index}: "
        if kind == "bytes":
            # A special byte id is ASCII: the bytes before it end a character.
            character = len(prompt.encode("utf-8")[:position].decode("utf-8"))
            what = f"U+{token:04X} at character {character}"
        else:
            what = f"token {position}"
        raise ValueError(
            f"{SPECIAL_TOKEN_ERROR} Received: {where}{prompt!r} ({what} is the special id {token})"
        )


def check_text(text, index: int | None = None) -> str:
    r"""`text` as a `str` under the Unicode rule: `bytes` must be valid UTF-8,
    a `str` must hold no lone surrogate; else `ValueError(UNICODE_ERROR ...)`.

    >>> check_text(b"caf\xc3\xa9")
    'café'
    >>> check_text(b"\xff\xfeA")
    Traceback (most recent call last):
    ...
    ValueError: Every prompt must be valid Unicode text: UTF-8 bytes, or a str without lone surrogates (U+D800 to U+DFFF); nothing is replaced silently. Received: b'\xff\xfeA' (invalid UTF-8 at byte 0)
    """
    where = "" if index is None else f"prompt {index}: "
    try:
        if isinstance(text, bytes):
            return text.decode("utf-8")
        if isinstance(text, str):
            text.encode("utf-8")  # only lone surrogates fail
    except UnicodeDecodeError as e:
        detail = f"{where}{text!r} (invalid UTF-8 at byte {e.start})"
        raise ValueError(f"{UNICODE_ERROR} Received: {detail}") from None
    except UnicodeEncodeError as e:
        detail = f"{where}{text!r} (lone surrogate at character {e.start})"
        raise ValueError(f"{UNICODE_ERROR} Received: {detail}") from None
    return text


def check_prompts(prompts) -> list[str]:
    """A list of non-empty `str` prompts under the Unicode rule (`check_text`;
    bytes are decoded as UTF-8).

    >>> check_prompts("Hi")
    ['Hi']
    """
    if isinstance(prompts, (str, bytes)):
        prompts = [prompts]
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError(_received(PROMPTS_ERROR, prompts))
    out = []
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, bytes)):
            raise ValueError(_received(PROMPTS_ERROR, prompts))
        if not prompt:
            raise ValueError(EMPTY_PROMPT_ERROR)
        out.append(check_text(prompt, index if len(prompts) > 1 else None))
    return out
