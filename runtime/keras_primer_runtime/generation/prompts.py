"""Prompts of the generation contract: non-empty strings under the Unicode rule.

A prompt must be valid Unicode text: `bytes` must be valid UTF-8, a `str`
must hold no lone surrogate (U+D800 to U+DFFF). Anything else is refused with
`ValueError` (the SavedModel: `InvalidArgumentError`) carrying
`UNICODE_ERROR`, in every runtime and for both tokenizers; nothing is
replaced or dropped silently. Generated ids that do not form valid UTF-8 (a
byte model may emit any byte) are shown as U+FFFD.
"""

from __future__ import annotations

from keras_primer_runtime.generation.options import _received

PROMPTS_ERROR = "`prompts` must be a non-empty string or a non-empty list of strings."
EMPTY_PROMPT_ERROR = "Every prompt must be a non-empty string (a prompt is empty)."
UNICODE_ERROR = (
    "Every prompt must be valid Unicode text: UTF-8 bytes, or a str without lone "
    "surrogates (U+D800 to U+DFFF); nothing is replaced silently."
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
