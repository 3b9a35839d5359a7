"""What kind of computation is being traced right now.

Some ops have a fast form that only XLA (or only TensorFlow's graph runtime)
runs well; layers ask here, at trace time, which one they are building for.
"""

import contextlib
import threading

import keras


class TraceFlag:
    """A switch that layers read while tracing: on inside `with flag.on():`
    (nests), off elsewhere. Thread-local, as tracing runs on the calling
    thread; a traced graph keeps what the flag said when it was traced."""

    def __init__(self):
        self._state = threading.local()

    @contextlib.contextmanager
    def on(self):
        depth = getattr(self._state, "depth", 0)
        self._state.depth = depth + 1
        try:
            yield
        finally:
            self._state.depth = depth

    @contextlib.contextmanager
    def off(self):
        """Off inside the block, whatever the enclosing blocks said."""
        depth = getattr(self._state, "depth", 0)
        self._state.depth = 0
        try:
            yield
        finally:
            self._state.depth = depth

    @property
    def active(self) -> bool:
        return getattr(self._state, "depth", 0) > 0


def in_tensorflow_xla_context() -> bool:
    """True while tracing TensorFlow code that XLA will compile
    (`jit_compile=True`); False on other backends and in plain TF graphs."""
    if keras.backend.backend() != "tensorflow":
        return False
    try:
        from tensorflow.python.framework import ops as tf_ops
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - a TensorFlow without these internals
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph()))
