"""Activation functions that Keras does not ship.

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


def _register_string_name() -> None:
    from keras.src import activations as keras_activations

    keras_activations.ALL_OBJECTS_DICT.setdefault("squared_relu", squared_relu)


_register_string_name()


def get_activation(identifier):
    """Resolves an activation by name, including the ones defined here."""
    return keras.activations.get(identifier)


def serialize_activation(activation):
    """The name under which `get_activation` finds `activation` again."""
    if activation is squared_relu:
        return "squared_relu"
    return keras.activations.serialize(activation)
