"""An ONNX export folder, described once: what it holds and how it is checked.

`keras-primer export` writes `export_config.json` beside the ONNX graphs and
the tokenizer files. The config records

* `format`: the layout of the step model's state (`EXPORT_FORMAT`); a folder
  written for another layout is refused, never run with the wrong loop;
* `fingerprints`: the SHA-256 of every file it describes (graphs, tokenizer
  files), so a swapped, edited or missing file is refused by name;
* the sizes the graphs were built with (vocabulary, `max_sequence_length`,
  tokenizer, state tensors), which are also stored inside each graph
  (`METADATA_KEY` in the ONNX model's metadata), so an edited config cannot
  make a runtime generate past the model's length or read other ids.

`read_export(folder)` checks the config and the fingerprints; the runtime
checks each graph's own metadata against the config when it loads it
(`check_graph_metadata`). Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os

CONFIG_FILE = "export_config.json"
#: 2: the step model's past grows (`past_length` = the position of the step).
EXPORT_FORMAT = 2
#: Key of the JSON the exporter stores in each ONNX graph's metadata.
METADATA_KEY = "keras_primer"
#: The config entries a graph must agree with (stored in the graph too).
GRAPH_FIELDS = ("family", "vocabulary_size", "max_sequence_length", "tokenizer", "states")

_REEXPORT = "re-export the model with `keras-primer export`"


class ExportFolderError(ValueError):
    """An export folder that cannot be served as it is; the message names the file."""


def file_fingerprint(path: str) -> str:
    """The SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def graph_metadata(config: dict) -> str:
    """The JSON stored in every graph of an export: the sizes it was built with."""
    return json.dumps({k: config[k] for k in GRAPH_FIELDS}, sort_keys=True)


def read_export(folder: str) -> dict:
    """The checked `export_config.json` of an ONNX export folder.

    Raises:
        ExportFolderError: The config is missing, not JSON, of another
            format, or a file it describes is missing or was changed since
            the export; the message names the file.
    """
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise ExportFolderError(
            f"{path} does not exist: {folder} is not a keras-primer ONNX export "
            f"(pass OUT/onnx of `keras-primer export`, or {_REEXPORT})."
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise ExportFolderError(f"{path} is not valid JSON ({error}): {_REEXPORT}.") from None
    if not isinstance(config, dict) or config.get("format") != EXPORT_FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise ExportFolderError(
            f"{path} describes an export of format {found!r}; this runtime runs format "
            f"{EXPORT_FORMAT}: {_REEXPORT} (or use the keras-primer-runtime of its version)."
        )
    missing = [k for k in ("files", "fingerprints", *GRAPH_FIELDS) if k not in config]
    if missing:
        raise ExportFolderError(f"{path} lacks {', '.join(missing)}: {_REEXPORT}.")
    for name, expected in config["fingerprints"].items():
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            raise ExportFolderError(
                f"{file} is missing (listed in {CONFIG_FILE}): copy the whole export folder, "
                f"or {_REEXPORT}."
            )
        if file_fingerprint(file) != expected:
            raise ExportFolderError(
                f"{file} is not the file that was exported with this folder (its SHA-256 "
                f"differs from {CONFIG_FILE}'s): restore it, or {_REEXPORT}."
            )
    return config


def check_graph_metadata(config: dict, metadata: dict, graph_path: str) -> None:
    """Refuses a graph whose stored sizes differ from the config's.

    `metadata` is the graph's custom metadata map (ONNX Runtime's
    `session.get_modelmeta().custom_metadata_map`).
    """
    stored = metadata.get(METADATA_KEY)
    if stored is None:
        raise ExportFolderError(
            f"{graph_path} carries no keras-primer metadata: it was not written by this "
            f"version of `keras-primer export`; {_REEXPORT}."
        )
    if json.loads(stored) != json.loads(graph_metadata(config)):
        differ = sorted(k for k, v in json.loads(stored).items() if config.get(k) != v)
        raise ExportFolderError(
            f"{os.path.join(os.path.dirname(graph_path), CONFIG_FILE)} does not describe "
            f"{graph_path} (they differ in {', '.join(differ)}): {_REEXPORT}."
        )
