"""Silences the deep-learning backends' start-up logs (stdlib only).

TensorFlow's C++ runtime, XLA and absl print oneDNN, CPU-feature and
plugin-registration lines on import, which bury a command's own output.
Their switches are environment variables read once, when the framework is
first imported, so `quiet_backend_logs` must run before any such import;
it is what the `keras-primer` command does first.

TensorFlow 2.21 also logs its oneDNN notice through absl's C++ logging
before any level applies, straight to file descriptor 2. So, when quiet,
the first `import tensorflow` runs with that descriptor pointed at
/dev/null (Python errors raised by the import still show: they are printed
after the descriptor is restored).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.machinery
import logging
import os
import sys
from collections.abc import Iterator

# Variable -> value that turns the log off. Read at import time by
# TensorFlow's C++ core, absl (TensorFlow's and JAX's Python logs, XLA) and
# gRPC; oneDNN's "custom operations are on" notice goes with TF_CPP_MIN_LOG_LEVEL.
QUIET_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TF_CPP_MIN_VLOG_LEVEL": "0",
    "ABSL_MIN_LOG_LEVEL": "3",
    "GRPC_VERBOSITY": "ERROR",
    "GLOG_minloglevel": "3",
}
QUIET_LOGGERS = ("tensorflow", "absl", "jax", "jax._src.xla_bridge", "h5py", "tf2onnx")

# The variables this module set, so `verbose=True` undoes only its own
# changes and never a value the user exported.
_set_by_us: set[str] = set()
# Whether the backends' logs are off (`quiet_backend_logs(verbose=False)`).
_quiet = False


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Points file descriptor 2 at /dev/null for the duration (C/C++ writes)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_native_logs() -> contextlib.AbstractContextManager:
    """`native_stderr_silenced()` while the backends' logs are off, else nothing.

    For native libraries that log to file descriptor 2 at INFO level with no
    switch of their own, e.g. the SentencePiece copy inside tensorflow-text
    ("normalizer.cc(51) LOG(INFO) ...") each time it loads a model.
    """
    return native_stderr_silenced() if _quiet else contextlib.nullcontext()


class _QuietImportLoader(importlib.abc.Loader):
    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        with native_stderr_silenced():
            self._loader.exec_module(module)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Runs the first `import tensorflow` with native stderr silenced."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietImportLoader(spec.loader)
        return spec


_FINDER = _QuietTensorFlowFinder()


def quiet_backend_logs(verbose: bool) -> None:
    """Turns the backends' logs off (`verbose=False`) or back to their defaults.

    Values the user already set in the environment are kept either way.
    Call it before TensorFlow, JAX or PyTorch is imported: the C++ log
    levels are read only then.

    Example:

    >>> import os
    >>> from keras_primer_cli.logging_setup import quiet_backend_logs
    >>> saved = os.environ.pop("ABSL_MIN_LOG_LEVEL", None)
    >>> quiet_backend_logs(verbose=False)
    >>> os.environ["ABSL_MIN_LOG_LEVEL"]
    '3'
    >>> quiet_backend_logs(verbose=True)
    >>> "ABSL_MIN_LOG_LEVEL" in os.environ
    False
    >>> if saved is not None:
    ...     os.environ["ABSL_MIN_LOG_LEVEL"] = saved
    """
    global _quiet
    _quiet = not verbose
    if verbose:
        for name in _set_by_us:
            os.environ.pop(name, None)
        _set_by_us.clear()
        for logger in QUIET_LOGGERS:
            logging.getLogger(logger).setLevel(logging.NOTSET)
        if _FINDER in sys.meta_path:
            sys.meta_path.remove(_FINDER)
        return
    for name, value in QUIET_ENV.items():
        if name not in os.environ:
            _set_by_us.add(name)
            os.environ[name] = value
    for logger in QUIET_LOGGERS:
        logging.getLogger(logger).setLevel(logging.ERROR)
    if "tensorflow" not in sys.modules and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
