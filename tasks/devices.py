"""Where training runs: `--device {auto,cpu,gpu}` and `--devices N`."""

from __future__ import annotations

import os

import tensorflow as tf

from tasks.config import ConfigError


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
