"""`import keras_primer` registers everything a saved file can reference, so a
compiled `.keras` file written by `keras-primer train` loads in a fresh process
with `safe_mode=True` on every backend."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Importing every module of the package must register nothing that
# `import keras_primer` alone did not already register.
WALK = r"""
import importlib, json, pkgutil
import keras
import keras_primer
after_package = set(keras.saving.get_custom_objects())
for module in pkgutil.walk_packages(keras_primer.__path__, "keras_primer."):
    if module.name.endswith("__main__"):
        continue
    importlib.import_module(module.name)
print(json.dumps({"package": sorted(after_package),
                  "missing": sorted(set(keras.saving.get_custom_objects()) - after_package)}))
"""

LOAD = r"""
import json, sys
import keras
import keras_primer
model = keras.saving.load_model(sys.argv[1], safe_mode=True)
print(json.dumps({
    "compiled": model.compiled,
    "optimizer": type(model.optimizer).__module__ + "." + type(model.optimizer).__name__,
    "iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
    "loss": type(model.loss).__name__,
}))
"""

# A few KB of text written for this test (any text does).
CORPUS = "\n".join(
    f"Line {i}: the {w} crossed the {v} at dawn, and {u} sang of rivers, stones and bread."
    for i, (w, v, u) in enumerate(
        [
            ("miller", "bridge", "the crow"),
            ("weaver", "field", "a child"),
            ("sailor", "square", "no one"),
        ]
        * 90
    )
)


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    return env


def _json_line(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.tensorflow_only
def test_package_import_registers_every_serializable():
    report = _json_line(
        subprocess.run(
            [sys.executable, "-c", WALK], capture_output=True, text=True, env=_env(), timeout=1800
        )
    )
    assert report["missing"] == [], (
        f"registered only when their module is imported: {report['missing']}"
    )
    for name in (
        "keras_primer>AdamW",
        "keras_primer>PrimerCausalLM",
        "keras_primer>FeedbackCausalLM",
        "keras_primer>squared_relu",
        "keras_primer>PrimerSentencePieceTokenizer",
    ):
        assert name in report["package"], name


@pytest.mark.slow
def test_trained_file_loads_compiled_in_fresh_process(tmp_path):
    """`keras-primer train` on this backend (in this process: the load is what
    needs a fresh one), then `import keras_primer; load_model` in a fresh process."""
    from keras_primer_runtime.train_cli import main

    (tmp_path / "corpus.txt").write_text(CORPUS)
    run = tmp_path / "run"
    flags = ["--data", str(tmp_path / "corpus.txt"), "--out", str(run), "--preset", "tiny"]
    flags += ["--steps", "2", "--batch-size", "4", "--sequence-length", "16"]
    assert main([*flags, "--eval-interval", "2", "--sample-tokens", "0", "--verbose", "0"]) == 0
    loaded = _json_line(
        subprocess.run(
            [sys.executable, "-c", LOAD, str(run / "model.keras")],
            capture_output=True,
            text=True,
            env=_env(),
            timeout=1800,
        )
    )
    assert loaded["compiled"] is True
    assert loaded["optimizer"] == "keras_primer.training.optimizer.AdamW"
    assert loaded["iterations"] == 2


# === Import layering (issue 21 item 1) ===
# layers < models / tokenizers / samplers < data < training / export: a module
# imports only from its own layer or below, at module level or in a function.
LOWER_LAYERS = (
    "keras_primer.activations",
    "keras_primer.layers",
    "keras_primer.models",
    "keras_primer.tokenizers",
    "keras_primer.generation",
    "keras_primer.utils",
)
UPPER_LAYERS = ("keras_primer.data", "keras_primer.training", "keras_primer.export")


def _package_imports():
    """`{module: {(imported module, at_module_level)}}` for `keras_primer`'s
    own imports, read from the source (nothing is imported)."""
    import ast

    modules = {}
    package_dir = os.path.join(ROOT, "keras_primer")
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[module.removesuffix(".__init__")] = path
    graph = {}
    for module, path in modules.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        top_level = set(map(id, tree.body))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target in modules and target != module:
                    edges.add((target, id(node) in top_level))
        graph[module] = edges
    return graph


def _within(module, prefixes):
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_lower_layers_never_import_data_training_or_export():
    """Regression: `data/tokenizers` -> `models/primer` -> `models/base` ->
    `models/generation` -> `generation` -> `data/tokenizers` was a cycle,
    broken only by imports inside functions."""
    graph = _package_imports()
    upward = sorted(
        (module, target)
        for module, edges in graph.items()
        if _within(module, LOWER_LAYERS)
        for target, _ in edges
        if _within(target, UPPER_LAYERS)
    )
    assert upward == []


def test_lower_layers_import_graph_has_no_cycle():
    """No cycle among the lower layers' module-level imports (each package's
    `__init__` counts, as Python runs it before its submodules)."""
    graph = _package_imports()

    def imports(module):
        found = set()
        for target, top in graph[module]:
            if not top:
                continue
            found.add(target)
            parts = target.split(".")
            for i in range(2, len(parts)):
                parent = ".".join(parts[:i])
                if parent in graph and not _within(module, [parent]):
                    found.add(parent)
        return {m for m in found if _within(m, LOWER_LAYERS)}

    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", " -> ".join(trail + [module])
        state[module] = "open"
        for target in sorted(imports(module)):
            visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(m for m in graph if _within(m, LOWER_LAYERS)):
        visit(module, [])
