"""Activation functions that Keras does not ship, and exact GELU for export.

`gelu` is the exact GELU written with `keras.ops.erf`: `get_activation("gelu")`
returns it (configs keep the name `"gelu"`), so training, Keras `generate` and
both exporters compute the same function. Keras' own `"gelu"` is the same
maths, but on TensorFlow it is `erfc`-based, and tf2onnx cannot convert
`Erfc` (not an ONNX operator): the Transformer baseline could not be exported.

`squared_relu` is registered twice when this module is imported (which
`import keras_primer` does):

* with Keras' serialization registry, so configs that hold it serialize and
  `.keras` files that use it load, also with `safe_mode=True`;
* under the plain name `"squared_relu"` in the table that
  `keras.activations.get` reads, so Keras' own layers accept the string
  (`keras.layers.Dense(4, activation="squared_relu")`). Keras has no public
  hook for string names, so this adds one entry to that table; a Keras that
  ships its own `"squared_relu"` keeps it.
"""

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_primer")
def squared_relu(x):
    """Squared ReLU, `max(x, 0) ** 2`, the Primer feed-forward activation.

    Its derivative `2 * max(x, 0)` is continuous, unlike ReLU's. After
    `import keras_primer` the name works in any Keras layer.

    Example:

    >>> import numpy as np
    >>> import keras
    >>> from keras_primer.activations import squared_relu
    >>> np.asarray(squared_relu(np.array([-1.0, 0.0, 0.5, 2.0])))
    array([0.  , 0.  , 0.25, 4.  ])
    >>> keras.activations.get("squared_relu") is squared_relu
    True
    """
    x = ops.convert_to_tensor(x)
    positive = ops.relu(x)
    return positive * positive


@keras.saving.register_keras_serializable(package="keras_primer")
def gelu(x):
    """Exact GELU, `x * Phi(x) = 0.5 * x * (1 + erf(x / sqrt(2)))`.

    The same function as Keras' `gelu` (`approximate=False`), within float
    rounding (for very negative `x` both are 0 to within `|x| * 2**-24`),
    built from `erf`, which every backend and ONNX have.

    Example:

    >>> import numpy as np
    >>> from keras_primer.activations import gelu
    >>> np.round(np.asarray(gelu(np.array([-1.0, 0.0, 1.0], "float32"))), 4)
    array([-0.1587,  0.    ,  0.8413], dtype=float32)
    """
    x = ops.convert_to_tensor(x)
    return 0.5 * x * (1.0 + ops.erf(x * (1.0 / math.sqrt(2.0))))


def _register_string_name() -> None:
    from keras.src import activations as keras_activations

    keras_activations.ALL_OBJECTS_DICT.setdefault("squared_relu", squared_relu)


_register_string_name()


# Names that resolve to a function of this module instead of Keras' own.
_OWN = {"gelu": gelu, "squared_relu": squared_relu}


def get_activation(identifier):
    """Resolves an activation by name, including the ones defined here;
    `"gelu"` is this module's exact `gelu` (exportable to ONNX)."""
    if isinstance(identifier, str) and identifier in _OWN:
        return _OWN[identifier]
    return keras.activations.get(identifier)


def serialize_activation(activation):
    """The name under which `get_activation` finds `activation` again."""
    for name, function in _OWN.items():
        if activation is function:
            return name
    return keras.activations.serialize(activation)
