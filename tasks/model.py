"""The model of the tf.GradientTape example, and where it runs."""

from __future__ import annotations

import keras
import tensorflow as tf

from tasks.config import ConfigError
from tasks.preprocess import IMAGE_SHAPE


def build_model() -> keras.Model:
    """Conv2D 32 3x3 relu -> Flatten -> Dense 128 relu -> Dense 10 logits.

    The model takes raw uint8 pixels: `Rescaling(1/255)` is the one place where
    pixels become float32 in [0, 1], so training, evaluation and anyone loading the
    saved `.keras` file feed it the same bytes the Parquet splits hold. The layer
    has no variables, so the trainable variables are exactly the example's.
    """
    return keras.Sequential(
        [
            keras.Input(shape=IMAGE_SHAPE, dtype="uint8", name="image"),
            keras.layers.Rescaling(1.0 / 255, name="normalize"),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, activation="relu", name="dense"),
            keras.layers.Dense(10, name="logits"),
        ],
        name="cnn",
    )


def resolve_device(requested: str) -> str:
    """The TensorFlow device to train on: a GPU when asked for (or when `auto` finds one), else the CPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if requested == "gpu" and not gpus:
        raise ConfigError("device 'gpu' was requested but TensorFlow sees no GPU (use --device auto or cpu)")
    if requested == "cpu" or not gpus:
        return "/CPU:0"
    for gpu in gpus:
        try:
            # Grow GPU memory on demand instead of taking the whole card at start.
            tf.config.experimental.set_memory_growth(gpu, True)
        except RuntimeError:
            pass  # the GPU was initialised already in this process; the setting is fixed
    return "/GPU:0"
