"""Training on many devices.

* JAX: `keras.distribution.DataParallel` (`data_parallel`) and
  `ModelParallel` with `primer_layout_map` (`model_parallel`: embedding,
  attention and feed-forward kernels sharded over a `"model"` mesh axis,
  the batch over `"batch"`). Multi-host: call `initialize_multi_host()`
  (`keras.distribution.initialize`) on every host before anything else
  (`keras-primer train --multi-host`); each process then feeds its own
  rows of every global batch.
* TensorFlow: `tf.distribute.MirroredStrategy` (`mirrored`, one host).
  `MultiWorkerMirroredStrategy` is not offered: Keras 3.15's TensorFlow
  trainer fails before the first step with it (`_maybe_symbolic_build`
  reduces the dict batch of per-replica values); use JAX for several hosts.
* PyTorch: Keras 3 has no `DistributedDataParallel` integration
  (`keras.distribution` is JAX-only), so PyTorch runs on one device; use
  the JAX or TensorFlow backend for several devices.

`distribution_scope(kind)` sets one of these up for the driver and undoes
it afterwards.
"""

from __future__ import annotations

import contextlib

import keras

from keras_primer_cli.run_config import DISTRIBUTIONS as KINDS
from keras_primer_cli.run_config import JAX_DISTRIBUTIONS as JAX_KINDS


def initialize_multi_host(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
    """`keras.distribution.initialize` for multi-host JAX (one call per host, first).

    With no arguments, JAX reads the cluster from the environment
    (`KERAS_DISTRIBUTION_JOB_ADDRESSES` (the first is the coordinator),
    `KERAS_DISTRIBUTION_NUM_PROCESSES`, `KERAS_DISTRIBUTION_PROCESS_ID`;
    or TPU pods and Slurm).

    Raises:
        ValueError: The backend is not JAX.
    """
    if keras.backend.backend() != "jax":
        raise ValueError(
            "Multi-host training through keras.distribution needs the JAX backend; "
            f"this is {keras.backend.backend()}."
        )
    keras.distribution.initialize(
        job_addresses=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def primer_layout_map(device_mesh, model_axis: str = "model"):
    """A `LayoutMap` sharding a `PrimerBackbone` (or the Transformer baseline).

    Token embedding: the width; query/key/value kernels, their biases and
    the depthwise convolutions: the heads; attention output: the heads;
    feed-forward: the intermediate width. Norms and position embeddings are
    replicated. `num_heads` and `intermediate_dim` must divide by the size
    of `model_axis`.
    """
    m = model_axis
    layout_map = keras.distribution.LayoutMap(device_mesh)
    layout_map["token_embedding/embeddings"] = (None, m)
    layout_map[r".*attention/(query|key|value)/kernel"] = (None, m, None)
    layout_map[r".*attention/(query|key|value)/bias"] = (m, None)
    layout_map[r".*attention/(query|key|value)_conv/kernel"] = (None, m, None)
    layout_map[r".*attention/attention_output/kernel"] = (m, None, None)
    layout_map[r".*feed_forward/intermediate/kernel"] = (None, m)
    layout_map[r".*feed_forward/intermediate/bias"] = (m,)
    layout_map[r".*feed_forward/output/kernel"] = (m, None)
    return layout_map


def data_parallel(devices: list | None = None):
    """`keras.distribution.DataParallel` over `devices` (default: all)."""
    devices = devices or keras.distribution.list_devices()
    return keras.distribution.DataParallel(devices=devices)


def model_parallel(model_axis_size: int = 2, devices: list | None = None):
    """`ModelParallel` on a `(batch, model)` mesh with `primer_layout_map`.

    Raises:
        ValueError: The device count does not divide by `model_axis_size`.
    """
    devices = devices or keras.distribution.list_devices()
    if len(devices) % model_axis_size:
        raise ValueError(
            f"{len(devices)} devices do not divide into a model axis of "
            f"{model_axis_size}. Pick a model axis size that divides the device count."
        )
    mesh = keras.distribution.DeviceMesh(
        shape=(len(devices) // model_axis_size, model_axis_size),
        axis_names=("batch", "model"),
        devices=devices,
    )
    return keras.distribution.ModelParallel(
        layout_map=primer_layout_map(mesh), batch_dim_name="batch"
    )


def worker_position(kind: str) -> tuple[int, int]:
    """`(index, count)` of this process among the processes of one run.

    `(0, 1)` on one host; for the JAX kinds `jax.process_index()` and
    `jax.process_count()` (call `initialize_multi_host` first). Process 0
    writes the run's outputs.
    """
    if kind in JAX_KINDS and keras.backend.backend() == "jax":
        import jax

        return jax.process_index(), jax.process_count()
    return 0, 1


class _Plan:
    """What the driver needs to know about a distribution.

    `replicas`: batch shards (the global batch must divide by it);
    `input_shard`: `(index, count)`, the rows of each global batch that this
    process feeds (JAX multi-host; tf.distribute shards batches itself).
    """

    def __init__(self, kind: str, replicas: int = 1, strategy=None, input_shard=(0, 1)):
        self.kind = kind
        self.replicas = replicas
        self.strategy = strategy
        self.input_shard = input_shard

    def check_batch_size(self, batch_size: int) -> None:
        """Raises `ValueError` when `batch_size` does not split over the replicas."""
        if batch_size % self.replicas:
            raise ValueError(
                f"Batch size {batch_size} does not divide by the {self.replicas} batch "
                f"shards of `{self.kind}`. Pass a --batch-size that is a multiple of "
                f"{self.replicas}."
            )

    def eval_batch_size(self, batch_size: int) -> int:
        return max(self.replicas, batch_size - batch_size % self.replicas)

    def dataset(self, dataset):
        if self.kind == "mirrored":
            from keras_primer.data import to_tf_dataset

            return to_tf_dataset(dataset)
        return dataset


@contextlib.contextmanager
def distribution_scope(kind: str = "none", model_axis_size: int = 2):
    """Sets up `kind` for building and training a model; undoes it on exit.

    Raises:
        ValueError: Unknown kind, or one the backend does not support (the
            message says which backend to use).
    """
    if kind not in KINDS:
        raise ValueError(f"Unknown distribution {kind!r}. Choose one of: {', '.join(KINDS)}.")
    backend = keras.backend.backend()
    if kind == "none":
        yield _Plan(kind)
        return
    if kind == "mirrored":
        if backend != "tensorflow":
            raise ValueError(
                f"`{kind}` (tf.distribute) needs the TensorFlow backend; this is "
                f"{backend}. On JAX use `data_parallel` or `model_parallel`; PyTorch "
                "has no multi-device support in Keras."
            )
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy()
        with strategy.scope():
            yield _Plan(kind, strategy.num_replicas_in_sync, strategy)
        return
    if backend != "jax":
        hint = (
            "use `mirrored` on TensorFlow"
            if backend == "tensorflow"
            else "Keras has no DistributedDataParallel support for PyTorch; use JAX or TensorFlow"
        )
        raise ValueError(f"`{kind}` (keras.distribution) needs the JAX backend; {hint}.")
    distribution = data_parallel() if kind == "data_parallel" else model_parallel(model_axis_size)
    input_shard = worker_position(kind)
    if input_shard[1] > 1:
        # Each process feeds its own rows (`input_shard`), so Keras must not
        # shard the input again (it only knows how to for tf.data).
        distribution.auto_shard_dataset = False
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(distribution)
    replicas = distribution.device_mesh.shape[0]
    try:
        yield _Plan(kind, replicas, input_shard=input_shard)
    finally:
        keras.distribution.set_distribution(previous)


def data_parallel_size() -> int:
    """Batch shards of the active `keras.distribution` (1 without one)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    axis = getattr(distribution, "batch_dim_name", None) or mesh.axis_names[0]
    return int(mesh.shape[list(mesh.axis_names).index(axis)])


def generate(lm, prompts, max_length: int | None = None):
    """`lm.generate(prompts)` for any batch size under a distribution.

    A distributed batch must divide by the number of batch shards; the
    prompts are padded (by repeating the last one) to a multiple, and the
    extra outputs dropped. A single string gives a single string.
    """
    single = isinstance(prompts, str)
    prompts = [prompts] if single else list(prompts)
    if not prompts:
        raise ValueError("`prompts` is empty: pass at least one prompt string.")
    shards = data_parallel_size()
    padded = prompts + [prompts[-1]] * (-len(prompts) % shards)
    if len(padded) == 1:
        outputs = [lm.generate(padded[0], max_length=max_length)]
    else:
        outputs = list(lm.generate(padded, max_length=max_length))
    outputs = outputs[: len(prompts)]
    return outputs[0] if single else outputs
