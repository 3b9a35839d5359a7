"""The decoding-state description a model reports: one `StateSpec` per tensor.

A causal LM's decoding cache is a small nested structure (dicts and lists)
of tensors; `decoding_state_specs()` lists each tensor once: where it sits
in the structure (`path`), its shape with the symbolic axes `"batch"` and
`"length"`, and its name as an input of the exported step model (the output
is named by `onnx_present_name`). Keras allocates the cache from the specs
(`empty_structure`), the exporters feed and read the step model by them, and
ONNX Runtime keeps the state by their names: the layout is declared once.

A `"length"` axis holds one row per position: a buffer of the whole
sequence in Keras `generate`, the growing past (the positions so far) in
the exported step. Other states (the depthwise convolutions' last rows) keep
their size.
"""

from __future__ import annotations

from dataclasses import dataclass

#: The decoder-with-past naming convention of the ONNX step model, declared once:
#: an attention cache tensor `N.key` goes in as `past_key_values.N.key` and comes
#: out as `present.N.key` (Hugging Face Optimum's names); any other state `S`
#: goes in as `S` and comes out as `present_S`.
ONNX_PAST_KEY_VALUES = "past_key_values."
#: The symbols of a state shape.
BATCH, LENGTH = "batch", "length"


def onnx_present_name(past: str) -> str:
    """The step model's output name for the state fed in as `past`.

    >>> onnx_present_name("past_key_values.0.key"), onnx_present_name("conv_state.1")
    ('present.0.key', 'present_conv_state.1')
    """
    if past.startswith(ONNX_PAST_KEY_VALUES):
        return "present." + past[len(ONNX_PAST_KEY_VALUES) :]
    return "present_" + past


@dataclass(frozen=True)
class StateSpec:
    """One tensor of a model's decoding state.

    Attributes:
        path: Its place in the cache structure: dict keys and list indices,
            e.g. `("key", 0)` for `cache["key"][0]`.
        shape: Ints and the symbols `"batch"` and `"length"`.
        onnx_name: Its input name in the exported step model.
        dtype: Its dtype in the exported model.

    >>> spec = StateSpec(("key", 0), ("batch", 4, "length", 8), "past_key_values.0.key")
    >>> spec.concrete(2, 5), spec.grows, spec.present_name
    ((2, 4, 5, 8), True, 'present.0.key')
    """

    path: tuple
    shape: tuple
    onnx_name: str
    dtype: str = "float32"

    @property
    def grows(self) -> bool:
        """True for a state with a row per position (the attention's past)."""
        return LENGTH in self.shape

    @property
    def length_axis(self) -> int | None:
        return self.shape.index(LENGTH) if self.grows else None

    @property
    def present_name(self) -> str:
        return onnx_present_name(self.onnx_name)

    def concrete(self, batch_size: int, length: int) -> tuple:
        """The shape for `batch_size` rows and `length` positions."""
        sizes = {BATCH: batch_size, LENGTH: length}
        return tuple(sizes.get(d, d) for d in self.shape)

    def to_json(self) -> dict:
        """What an export records of the tensor (`export_config.json`)."""
        return {
            "past": self.onnx_name,
            "present": self.present_name,
            "shape": list(self.shape),
            "dtype": self.dtype,
        }


def empty_structure(specs, make) -> dict:
    """The nested cache structure of `specs`, each tensor `make(spec)`.

    >>> specs = [StateSpec(("key", 0), (1,), "k0"), StateSpec(("key", 1), (1,), "k1"),
    ...          StateSpec(("conv",), (2,), "c")]
    >>> empty_structure(specs, lambda spec: spec.onnx_name)
    {'key': ['k0', 'k1'], 'conv': 'c'}
    """
    root: dict = {}
    for spec in specs:
        node = root
        for key, next_key in zip(spec.path, spec.path[1:]):
            if isinstance(node, list):
                while len(node) <= key:
                    node.append(None)
            if (
                isinstance(node, dict)
                and key not in node
                or isinstance(node, list)
                and node[key] is None
            ):
                node[key] = [] if isinstance(next_key, int) else {}
            node = node[key]
        last = spec.path[-1]
        if isinstance(node, list):
            while len(node) <= last:
                node.append(None)
        node[last] = make(spec)
    return root


def structure_get(structure, path: tuple):
    """The tensor at `path` of a cache structure."""
    for key in path:
        structure = structure[key]
    return structure
