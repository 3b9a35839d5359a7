"""The import graph of the three packages, late imports (inside functions) counted.

* `keras_primer_runtime` (the `keras-primer-runtime` distribution) imports
  nothing of `keras_primer` or `keras_primer_cli`, and no framework but
  TensorFlow's protos inside the gRPC functions of its TF Serving client;
* `keras_primer_cli` imports the library only in its command modules, each
  once, inside the function that runs the command;
* inside the library, layers < models / tokenizers / generation < data <
  training / export: nothing imports upwards;
* the whole graph has no cycle (a package's `__init__` counts: Python runs
  it before its submodules).

Read from the source with `ast`: nothing is imported.
"""

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = {
    "keras_primer": ROOT,
    "keras_primer_cli": ROOT,
    "keras_primer_runtime": os.path.join(ROOT, "runtime"),
}
FRAMEWORKS = ("keras", "keras_hub", "tensorflow", "jax", "torch", "tf2onnx", "tensorflow_text")
LOWER_LAYERS = (
    "keras_primer.activations",
    "keras_primer.layers",
    "keras_primer.models",
    "keras_primer.tokenizers",
    "keras_primer.generation",
    "keras_primer.utils",
)
UPPER_LAYERS = ("keras_primer.data", "keras_primer.training", "keras_primer.export")
# The command modules of the front end, and the one library module each imports.
COMMAND_ENTRIES = {
    "keras_primer_cli.train": {"keras_primer.training.command"},
    "keras_primer_cli.export": {"keras_primer.export.command"},
}

pytestmark = pytest.mark.tensorflow_only


def _modules() -> dict[str, str]:
    found = {}
    for package, base in PACKAGES.items():
        for folder, _, files in os.walk(os.path.join(base, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
                    found[module.removesuffix(".__init__")] = path
    return found


def _imports():
    """`{module: [(imported name, at module level, enclosing function)]}`."""
    graph = {}
    for module, path in _modules().items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        edges = []

        def walk(node, function, edges=edges):
            for child in ast.iter_child_nodes(node):
                inner = function
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inner = child.name if function is None else f"{function}.{child.name}"
                if isinstance(child, ast.Import):
                    edges.extend((a.name, function is None, function) for a in child.names)
                elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                    edges.append((child.module, function is None, function))
                    edges.extend(
                        (f"{child.module}.{a.name}", function is None, function)
                        for a in child.names
                    )
                walk(child, inner, edges)

        walk(tree, None)
        graph[module] = edges
    return graph


def _within(module, prefixes):
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _internal_edges():
    """`{module: {imported module}}` among the three packages, with the
    packages Python runs first (`a.b` for an import of `a.b.c`)."""
    modules = _modules()
    out = {}
    for module, edges in _imports().items():
        targets = set()
        for name, _, _ in edges:
            if name not in modules or name == module:
                continue
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                parent = ".".join(parts[:i])
                if parent in modules and parent != module and not _within(module, [parent]):
                    targets.add(parent)
        out[module] = targets
    return out


def test_runtime_imports_nothing_of_the_library_or_the_command_line():
    wrong = sorted(
        (module, name)
        for module, edges in _imports().items()
        if _within(module, ["keras_primer_runtime"])
        for name, _, _ in edges
        if _within(name, ["keras_primer", "keras_primer_cli"])
    )
    assert wrong == []


def test_runtime_imports_no_framework_but_tensorflow_protos_for_grpc():
    frameworks = sorted(
        (module, name, function)
        for module, edges in _imports().items()
        if _within(module, ["keras_primer_runtime"])
        for name, _, function in edges
        if _within(name, FRAMEWORKS)
    )
    allowed = {"grpc_request", "predict_grpc"}
    assert {(m, f) for m, _, f in frameworks} <= {
        ("keras_primer_runtime.serving_client", f) for f in allowed
    }, frameworks


def test_command_line_imports_the_library_only_in_its_command_entries():
    modules = _modules()
    found = {}
    for module, edges in _imports().items():
        if not _within(module, ["keras_primer_cli"]):
            continue
        library = {
            (name, top)
            for name, top, _ in edges
            if name in modules and _within(name, ["keras_primer"])
        }
        if library:
            found[module] = library
    assert set(found) == set(COMMAND_ENTRIES)
    for module, library in found.items():
        assert {name for name, _ in library} == COMMAND_ENTRIES[module]
        assert not any(top for _, top in library), f"{module} imports the library at import"


def test_lower_layers_never_import_data_training_or_export():
    """Regression: `data/tokenizers` -> `models/primer` -> `models/base` ->
    `models/generation` -> `generation` -> `data/tokenizers` was a cycle,
    broken only by imports inside functions."""
    upward = sorted(
        (module, target)
        for module, targets in _internal_edges().items()
        if _within(module, LOWER_LAYERS)
        for target in targets
        if _within(target, UPPER_LAYERS)
    )
    assert upward == []


def test_import_graph_has_no_cycle_late_imports_counted():
    graph = _internal_edges()
    state = {}

    def visit(module, trail):
        if state.get(module) == "done":
            return
        assert state.get(module) != "open", "import cycle: " + " -> ".join(trail + [module])
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            visit(target, trail + [module])
        state[module] = "done"

    for module in sorted(graph):
        visit(module, [])
