"""The decoding-state description a model reports, and its ONNX tensor names."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

#: The decoder-with-past naming convention of the ONNX step model, declared once:
#: an attention cache tensor `N.key` goes in as `past_key_values.N.key` and comes
#: out as `present.N.key` (Hugging Face Optimum's names); any other state `S`
#: goes in as `S` and comes out as `present_S`.
ONNX_PAST_KEY_VALUES = "past_key_values."


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
    """One decoding-state tensor as the model describes it.

    `shape` holds ints and the symbols `"batch"` and `"max_length"` (the
    dynamic axes); the runtime fills them in. The ONNX step model feeds the
    state as one tensor per index of the `onnx_split` axes, each named by
    `onnx_name.format(*labels)`, a label being the index or, where the axis
    has them, its `onnx_labels` entry (see `onnx_tensors`).

    >>> StateSpec("key", ("batch", "max_length", 2, 8), "float32").concrete(1, 5)
    (1, 5, 2, 8)
    """

    name: str
    shape: tuple
    dtype: str = "float32"
    onnx_name: str = ""
    onnx_split: tuple = ()
    onnx_labels: tuple = ()

    def concrete(self, batch_size: int, max_length: int) -> tuple:
        """The shape for `batch_size` rows of up to `max_length` tokens."""
        sizes = {"batch": batch_size, "max_length": max_length}
        return tuple(sizes.get(d, d) for d in self.shape)

    def onnx_tensors(self) -> list[dict]:
        """The ONNX tensors of this state, in graph order.

        Each: `state` (this name), `index` (per axis after the batch axis up
        to the last split one: the index taken, None for a kept axis),
        `shape` (the split axes dropped), `past`/`present` (ONNX names) and
        `dtype`.

        >>> spec = StateSpec("kv", ("batch", 2, 2, "max_length", 4), onnx_name="past_key_values.{}.{}",
        ...                  onnx_split=(1, 2), onnx_labels=((), ("key", "value")))
        >>> [(t["past"], t["present"], t["index"], t["shape"]) for t in spec.onnx_tensors()][1]
        ('past_key_values.0.value', 'present.0.value', [0, 1], ['batch', 'max_length', 4])
        """
        if not self.onnx_name:
            raise ValueError(f"Decoding state {self.name!r} has no ONNX name.")
        labels = dict(itertools.zip_longest(self.onnx_split, self.onnx_labels, fillvalue=()))
        shape = [d for axis, d in enumerate(self.shape) if axis not in self.onnx_split]
        out = []
        for indices in itertools.product(*(range(self.shape[a]) for a in self.onnx_split)):
            chosen = dict(zip(self.onnx_split, indices))
            past = self.onnx_name.format(
                *(labels[a][i] if labels[a] else i for a, i in chosen.items())
            )
            out.append(
                dict(
                    state=self.name,
                    index=[chosen.get(a) for a in range(1, max(self.onnx_split, default=0) + 1)],
                    shape=shape,
                    past=past,
                    present=onnx_present_name(past),
                    dtype=self.dtype,
                )
            )
        return out

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict) -> StateSpec:
        return cls(data["name"], tuple(data["shape"]), data.get("dtype", "float32"))
