"""The expected failures of the `keras-primer` commands, and their one line (stdlib only).

An expected failure (a bad setting, a missing or corrupt file, a missing
optional package, a locked or occupied output folder) is reported as one
line on stderr with exit status 2; `--debug` shows the traceback instead.

>>> error_line(ConfigError("--steps must be at least 1."), "keras-primer train")
'keras-primer train: error: --steps must be at least 1.'
>>> error_line(PermissionError(13, "Permission denied", "/srv/models"), "keras-primer export")
"keras-primer export: error: [Errno 13] Permission denied: '/srv/models' (check the path, its permissions and free disk space; --debug shows the traceback)"
"""

from __future__ import annotations

#: Exit status of an expected failure, and of an interrupted command (128 + SIGINT).
EXIT_EXPECTED_FAILURE = 2
EXIT_INTERRUPTED = 130
#: What a command stopped by Ctrl-C before it wrote anything says (`interrupted_line`).
NOTHING_WRITTEN = "nothing written to --out"


class ConfigError(ValueError):
    """A setting of a run is wrong; the message says which and what is expected."""


class ExportError(Exception):
    """An expected export failure: the message names the file and the fix."""


# ValueError covers bad settings, data and checkpoint errors (their classes
# derive from it); the others are I/O and missing optional packages.
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (
    ExportError,
    ValueError,
    OSError,
    ImportError,
    RuntimeError,
)


def error_line(error: BaseException, prog: str | None = None) -> str:
    """The one line a command prints for an expected failure: its message,
    and a hint where the message cannot name the fix itself (`prog`, when
    given, leads the line)."""
    message = printable(" ".join(str(error).split())) or type(error).__name__
    if isinstance(error, (ExportError, ValueError)):
        hint = ""
    elif isinstance(error, OSError):
        hint = " (check the path, its permissions and free disk space; --debug shows the traceback)"
    else:
        hint = " (--debug shows the traceback)"
    return f"{prog}: error: {message}{hint}" if prog else f"{message}{hint}"


def interrupted_line(prog: str, outcome: str) -> str:
    """The one line a command prints when Ctrl-C stops it (exit status 130).

    >>> interrupted_line("keras-primer export", "nothing written to --out")
    'keras-primer export: interrupted: nothing written to --out'
    """
    return f"{prog}: interrupted: {outcome}"


def printable(text: str) -> str:
    r"""`text` as any UTF-8 stream can print it: a byte of a path that is not
    UTF-8 (a Linux path is bytes; Python holds such a byte as a surrogate
    escape, which a strict stream refuses) is shown as `\xNN`.

    >>> print(printable(b"runs/bad\xff".decode("utf-8", "surrogateescape")))
    runs/bad\xff
    """
    try:
        data = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that no path holds
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return data.decode("utf-8", "backslashreplace")
