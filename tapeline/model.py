"""The model of the tf.GradientTape example."""

from __future__ import annotations

import keras

from tapeline.data.splits import IMAGE_SHAPE

INPUT_DTYPE = "uint8"  # raw pixels: see build_model


def build_model(precision: str = "float32") -> keras.Model:
    """Conv2D 32 3x3 relu -> Flatten -> Dense 128 relu -> Dense 10 logits.

    The model takes raw uint8 pixels: `Rescaling(1/255)` is the one place where
    pixels become float32 in [0, 1], so training, evaluation and anyone loading the
    saved `.keras` file feed it the same bytes the Parquet splits hold. The layer
    has no variables, so the trainable variables are exactly the example's.

    Under a mixed `precision` the layers compute in 16 bits and keep float32
    variables; the logits stay float32 so the softmax and loss do not lose range.
    """
    return keras.Sequential(
        [
            keras.Input(shape=IMAGE_SHAPE, dtype=INPUT_DTYPE, name="image"),
            keras.layers.Rescaling(1.0 / 255, name="normalize", dtype=precision),
            keras.layers.Conv2D(32, 3, activation="relu", name="conv", dtype=precision),
            keras.layers.Flatten(name="flatten", dtype=precision),
            keras.layers.Dense(128, activation="relu", name="dense", dtype=precision),
            keras.layers.Dense(10, name="logits", dtype="float32"),
        ],
        name="cnn",
    )
