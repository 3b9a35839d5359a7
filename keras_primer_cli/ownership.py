"""What keras-primer owns in a folder, and how it recognizes it, declared once (stdlib only).

* Temporary names: a command removes a leftover temporary file or folder
  only when its whole name is one the command writes: a fixed prefix, the
  name of what it stands for, and a unique suffix (`<pid>-<8 hex digits>`).
  The recognizer is built from the same template as the names, so the two
  cannot drift apart, and a user's `.draft.tmp-1` or
  `.keras-primer-export-mine` is never taken for ours.
* A run folder is a folder holding our `run.json` (a run record); an export
  folder holds `serving/models.config` or `onnx/export_config.json` (or an
  export's temporary folder). Nothing else is ours.

>>> name = ATOMIC_WRITE.name(target="model.keras", suffix=".keras")
>>> ATOMIC_WRITE.matches(name, target=("model.keras",), suffix=("", ".keras"))
True
>>> ATOMIC_WRITE.matches(".draft.tmp-1", target=("model.keras",), suffix=("",))
False
>>> EXPORT_STAGING.matches(EXPORT_STAGING.name()), EXPORT_STAGING.matches(".keras-primer-export-x")
(True, False)
"""

from __future__ import annotations

import json
import os
import re
import secrets
import string
from collections.abc import Iterable

from keras_primer_cli.errors import ConfigError
from keras_primer_runtime.ort_generator import CONFIG_FILE as ONNX_CONFIG_FILE

#: The unique part of every temporary name: the writer's pid and 8 random hex digits.
UNIQUE_PATTERN = r"\d+-[0-9a-f]{8}"


def unique_suffix() -> str:
    """`<pid>-<8 hex digits>`: unique among the processes and calls that write a folder."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


class TempName:
    """A template of temporary names with a `{unique}` field and named fields.

    Args:
        template: e.g. `".{target}.tmp-{unique}{suffix}"`; `{unique}` is
            filled by `unique_suffix()`, the other fields by the caller.
    """

    def __init__(self, template: str):
        self.template = template
        self.fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
        if "unique" not in self.fields:
            raise ValueError(f"A temporary name needs a {{unique}} field: {template!r}.")

    def name(self, **fields: str) -> str:
        """A new temporary name (each call a different one)."""
        values = {f: "" for f in self.fields}
        values.update(fields, unique=unique_suffix())
        return self.template.format(**values)

    def pattern(self, **choices: Iterable[str] | re.Pattern) -> re.Pattern:
        """The regex of every name `name(**fields)` can give, each field one of
        `choices` (exact values, or a regex of them).

        A field left out of `choices` matches the empty string only.
        """
        parts = []
        for literal, field, _, _ in string.Formatter().parse(self.template):
            parts.append(re.escape(literal))
            if field == "unique":
                parts.append(UNIQUE_PATTERN)
            elif field:
                values = choices.get(field, ("",))
                if isinstance(values, re.Pattern):
                    parts.append(f"(?:{values.pattern})")
                else:
                    exact = sorted(set(values), key=len, reverse=True)
                    parts.append("(?:" + "|".join(re.escape(v) for v in exact) + ")")
        return re.compile("".join(parts))

    def matches(self, name: str, **choices: Iterable[str] | re.Pattern) -> bool:
        """Whether `name` is, whole, a name this template writes (see `pattern`)."""
        return self.pattern(**choices).fullmatch(name) is not None


#: The temporary sibling of an atomically written file: `.<target>.tmp-<unique><suffix>`.
ATOMIC_WRITE = TempName(".{target}.tmp-{unique}{suffix}")
#: The temporary folder an export writes inside its `--out`.
EXPORT_STAGING = TempName(".keras-primer-export-{unique}")

#: The record of a run, in its folder: a folder is a run folder only with it.
RUN_RECORD = "run.json"
#: What an export writes into its `--out`.
SERVING_DIR, MODELS_CONFIG, ONNX_DIR = "serving", "models.config", "onnx"


def read_run_record(path: str) -> dict:
    """The run record in `path` (a `run.json`), checked to be one.

    Raises:
        ConfigError: The file is empty, not JSON, or not a run record; the
            message names the file and the ways forward.
    """
    problem = None
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        problem = f"not JSON ({error})"
    else:
        if not isinstance(record, dict):
            problem = f"a JSON {type(record).__name__}, not an object"
        elif not isinstance(record.get("definition"), dict):
            problem = "without a `definition` object"
        elif not isinstance(record.get("steps"), int) or isinstance(record.get("steps"), bool):
            problem = "without an integer `steps`"
        elif not isinstance(record.get("changes", []), list):
            problem = "with `changes` that is not a list"
    if problem:
        raise ConfigError(
            f"{path} is not a keras-primer run record: {problem}. Restore it from a backup, "
            "or pass another --out (deleting run.json and checkpoints/ starts the run afresh)."
        )
    return record


def is_run_folder(folder: str) -> bool:
    """Whether `folder` holds our `run.json` (a readable run record)."""
    path = os.path.join(folder, RUN_RECORD)
    if not os.path.isfile(path):
        return False
    try:
        read_run_record(path)
    except (ConfigError, OSError):
        return False
    return True


def is_export_folder(folder: str) -> bool:
    """Whether `folder` is an export's `--out`: it holds `serving/models.config`,
    `onnx/export_config.json` or an export's temporary folder."""
    if os.path.isfile(os.path.join(folder, SERVING_DIR, MODELS_CONFIG)) or os.path.isfile(
        os.path.join(folder, ONNX_DIR, ONNX_CONFIG_FILE)
    ):
        return True
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    return any(EXPORT_STAGING.matches(name) for name in names)
