"""The model of the tf.GradientTape example."""

from __future__ import annotations

import keras

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
