"""Shared fixtures. The Keras backend comes from KERAS_BACKEND (one pytest run each)."""

import os

import keras
import numpy as np
import pytest

BACKEND = keras.backend.backend()


def pytest_collection_modifyitems(config, items):
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


@pytest.fixture(scope="session")
def shakespeare_path():
    path = os.environ.get("KERAS_PRIMER_SHAKESPEARE") or os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "data", "tinyshakespeare.txt"
    )
    if not os.path.exists(path):
        pytest.skip(f"Tiny Shakespeare not found at {path}")
    return os.path.abspath(path)
