"""Shared fixtures. The Keras backend comes from KERAS_BACKEND (one pytest run each)."""

import atexit
import os
import shutil
import tempfile

# Under pytest-xdist (`make test` runs one worker per core): one compute thread
# per worker. The tiny test models gain nothing from intra-op thread pools, and
# a pool per worker oversubscribes the cores. XLA (JAX, TensorFlow's
# `jit_compile`) compiles without LLVM's optimisations: on JAX every eager op
# of a new shape is compiled, and for these tiny models compiling is most of
# the time (a new input shape costs 25% less), and with XLA's older loop
# emitters instead of its fusion emitters (measured: 40% less CPU again for
# JAX's eager ops and for three JAX test files). Set before the
# frameworks load; the subprocesses the tests start inherit it. An explicit
# setting wins.
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name, _value in {
        "TF_NUM_INTRAOP_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        # Flags only: XLA stops reading XLA_FLAGS at the first word that is
        # not a `--flag` (the common `intra_op_parallelism_threads=1` is not
        # one, and silently dropped every flag after it).
        "XLA_FLAGS": " ".join(
            (
                "--xla_cpu_multi_thread_eigen=false",
                "--xla_backend_optimization_level=0",
                "--xla_cpu_use_fusion_emitters=false",
            )
        ),
    }.items():
        os.environ.setdefault(_name, _value)

import keras  # noqa: E402
import numpy as np
import pytest

BACKEND = keras.backend.backend()

if BACKEND == "jax" and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    import jax

    # Keras traces every new model again, and JAX compiles each trace again, even
    # when an identical model was compiled before. A compilation cache keyed on
    # the program reuses the executable (a second identical tiny model compiles
    # in a tenth of the CPU time). `make test` names one folder for all its
    # processes (JAX_COMPILATION_CACHE_DIR, read by JAX itself, so that the
    # subprocesses share it too); a plain `pytest` gets one folder per process.
    _JAX_CACHE = tempfile.mkdtemp(prefix="keras-primer-jax-cache-")
    atexit.register(shutil.rmtree, _JAX_CACHE, ignore_errors=True)
    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


# Modules whose tests share module-scoped fixtures (an export, a reference
# training run): each runs whole on one xdist worker, so the fixture is built
# once. Every other test is scheduled on its own.
SHARED_FIXTURE_MODULES = ("test_export_onnx.py", "test_export_savedmodel.py", "test_faults.py")


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """xdist's `loadgroup` with the groups above. (pytest-xdist 3.8 marks a
    group by rewriting `item._nodeid`, which pytest 9 no longer reads: its
    `xdist_group` marks are silently ignored.)"""
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            module = nodeid.split("::", 1)[0]
            return module if os.path.basename(module) in SHARED_FIXTURE_MODULES else nodeid

    return SharedFixtureScheduling(config, log)


def _runs_long(item):
    return item.get_closest_marker("slow") or os.path.basename(item.path) in SHARED_FIXTURE_MODULES


def pytest_collection_modifyitems(config, items):
    # Long tests first (end-to-end ones and whole module groups), so that
    # parallel workers do not end the run waiting on one long test.
    items.sort(key=lambda item: not _runs_long(item))
    if BACKEND == "tensorflow":
        return
    skip = pytest.mark.skip(reason="runs once, in the TensorFlow-backend pass")
    for item in items:
        if "tensorflow_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    np.random.seed(0)
    yield
    keras.config.set_dtype_policy("float32")


SAMPLE_TEXT = os.path.join(os.path.dirname(__file__), "data", "sonnets.txt")


@pytest.fixture(scope="session")
def sample_text_path():
    """A small committed corpus (ten Shakespeare sonnets, public domain, 5.6 KB)
    for tests that need some text but not the real corpus."""
    return SAMPLE_TEXT


@pytest.fixture(scope="session")
def shakespeare_path():
    """Tiny Shakespeare, for the few tests that need the real corpus.

    From `$KERAS_PRIMER_SHAKESPEARE`, else `../shared/data/tinyshakespeare.txt`.
    Missing: the test FAILS when `CI=true` (CI must never test less than it
    says) and is skipped, with the reason, on a contributor's machine.
    """
    path = os.environ.get("KERAS_PRIMER_SHAKESPEARE") or os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt"
    )
    if not os.path.exists(path):
        message = (
            f"Tiny Shakespeare not found at {os.path.abspath(path)}: set "
            "KERAS_PRIMER_SHAKESPEARE to a local copy of tinyshakespeare.txt."
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " (CI=true: a missing corpus is a failure, not a skip)")
        pytest.skip(message)
    return os.path.abspath(path)
