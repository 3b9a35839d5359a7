"""Activation functions that Keras does not ship.

`squared_relu` is registered with Keras' serialization registry, so a layer
config can name it (`activation="squared_relu"`) and `.keras` files that use it
load with `safe_mode=True`.
"""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="keras_primer")
def squared_relu(x):
    """Squared ReLU, `max(x, 0) ** 2`, the Primer feed-forward activation.

    Its derivative `2 * max(x, 0)` is continuous, unlike ReLU's.

    Example:

    >>> import numpy as np
    >>> from keras_primer.activations import squared_relu
    >>> np.asarray(squared_relu(np.array([-1.0, 0.0, 0.5, 2.0])))
    array([0.  , 0.  , 0.25, 4.  ])
    """
    x = ops.convert_to_tensor(x)
    positive = ops.relu(x)
    return positive * positive


def get_activation(identifier):
    """Resolves an activation by name, including the ones defined here."""
    if identifier == "squared_relu":
        return squared_relu
    return keras.activations.get(identifier)


def serialize_activation(activation):
    """The name under which `get_activation` finds `activation` again."""
    if activation is squared_relu:
        return "squared_relu"
    return keras.activations.serialize(activation)
