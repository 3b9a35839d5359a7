"""What the machine can do, to put a model's speed in proportion.

A benchmark that prints only tokens/s cannot say whether 5,000 tokens/s is good.
These helpers measure the two ceilings of the current backend on this machine
(dense matmul throughput and memory-copy bandwidth) and count the work a model
does per token, so benchmarks can print model FLOPs utilisation (training) and
bandwidth utilisation (decoding) next to their timings.
"""

from __future__ import annotations

import time

import keras
from keras import ops
from timing import block, compile_plain


def _best_seconds(fn, repeats: int) -> float:
    block(fn())  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        block(fn())
        best = min(best, time.perf_counter() - start)
    return best


def matmul_peak_flops(size: int = 2048, repeats: int = 5, dtype: str = "float32") -> float:
    """Best FLOP/s of one `size` x `size` matmul on the current backend (compiled
    where the backend compiles)."""
    a = ops.convert_to_tensor(keras.random.normal((size, size), seed=1), dtype=dtype)
    b = ops.convert_to_tensor(keras.random.normal((size, size), seed=2), dtype=dtype)
    matmul = compile_plain(ops.matmul)
    return 2.0 * size**3 / _best_seconds(lambda: matmul(a, b), repeats)


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Best bytes/s of reading and writing one float32 array of `megabytes` once
    (`x + 1`, which reads every byte and writes every byte)."""
    x = ops.zeros((megabytes * 2**20 // 4,), dtype="float32")
    add_one = compile_plain(lambda t: t + 1.0)
    return 2.0 * megabytes * 2**20 / _best_seconds(lambda: add_one(x), repeats)


def training_flops_per_token(
    num_layers: int, hidden_dim: int, intermediate_dim: int, vocabulary_size: int, context: int
) -> float:
    """Forward + backward FLOPs per trained token of a decoder-only Transformer.

    6 FLOPs per weight per token (2 forward, 4 backward) for the four attention
    projections, the two feed-forward matrices and the tied output head, plus
    the attention scores and weighted sum (2 x 2 x context x hidden_dim per
    layer forward, times 3). MDHA's width-3 convolutions add 3 x 3 x 2 x
    hidden_dim per layer forward, under 0.1% here, and are left out so every
    model is measured against the same count.

    >>> round(training_flops_per_token(4, 256, 1024, 256, 256) / 1e6, 1)
    22.4
    """
    weights = num_layers * (4 * hidden_dim**2 + 2 * hidden_dim * intermediate_dim)
    weights += vocabulary_size * hidden_dim
    attention = num_layers * 2 * 2 * context * hidden_dim
    return 6.0 * weights + 3.0 * attention


def decode_bytes_per_token(
    num_parameters: int, num_layers: int, hidden_dim: int, position: int, bytes_per_value: int = 4
) -> float:
    """Bytes a decoder must read to produce the token at `position`: every weight
    once and the keys and values of the `position` earlier tokens in each layer.

    >>> decode_bytes_per_token(1000, 2, 8, 10)
    5280.0
    """
    return float(bytes_per_value * (num_parameters + 2 * num_layers * position * hidden_dim))
