"""Where training runs: `--device {auto,cpu,gpu}` and `--devices N`."""

from __future__ import annotations

import os

import tensorflow as tf

from tapeline.errors import ConfigError
from tapeline.training.cluster import check_cluster


def resolve_devices(kind: str, count: int = 1) -> list[str]:
    """The TensorFlow devices to train on; an error, before any work, when they are not there.

    `auto` takes GPUs when TensorFlow sees any, else the CPU. With no GPU, `count > 1`
    splits the CPU into that many logical devices (at most one per core): no faster
    than one, but the same MirroredStrategy code path a multi-GPU machine runs.
    This must happen before TensorFlow starts its runtime, so call it early.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if kind == "gpu" and not gpus:
        raise ConfigError("device 'gpu' was requested but TensorFlow sees no GPU (use --device auto or cpu)")
    if kind != "cpu" and gpus:
        if count > len(gpus):
            raise ConfigError(f"devices {count}: TensorFlow sees {len(gpus)} GPU(s)")
        for gpu in gpus:
            try:  # grow GPU memory on demand instead of taking the whole card at start
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:
                pass  # already initialised in this process; the setting is fixed
        return [f"/GPU:{i}" for i in range(count)]
    if count > 1:
        _split_cpu(count)
    return [f"/CPU:{i}" for i in range(count)]


def _split_cpu(count: int) -> None:
    cores = os.cpu_count() or 1
    if count > cores:
        raise ConfigError(f"devices {count}: this machine has no GPU and {cores} CPU cores")
    cpu = tf.config.list_physical_devices("CPU")[0]
    existing = tf.config.get_logical_device_configuration(cpu)
    if existing and len(existing) >= count:
        return
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        raise ConfigError(f"devices {count}: TensorFlow already started with one CPU device in this process") from None


def check_placement(config) -> None:
    """Devices and, under TF_CONFIG, the cluster, for a RunConfig: a ConfigError now, before any stage runs."""
    cluster = check_cluster(resolve_devices(config.device, config.devices), config.run_name)
    if cluster and not cluster.chief:
        raise ConfigError(f"TF_CONFIG names this process {cluster}: the flow runs on the chief, the others run `tapeline worker`")
