"""The model of the tf.GradientTape example, and its loss: the one definition training, verify and evaluation use."""

from __future__ import annotations

import keras

from tapeline.data.splits import IMAGE_SHAPE

INPUT_DTYPE = "uint8"  # raw pixels: see build_model


def build_model(precision: str = "float32") -> keras.Model:
    """Conv2D 32 3x3 relu -> Flatten -> Dense 128 relu -> Dense 10 logits.

    The model takes raw uint8 pixels: `Rescaling(1/255)` is the one place where
    pixels become float32 in [0, 1], so training, evaluation and anyone loading the
    saved `.keras` file feed it the same bytes the Parquet splits hold. The layer
    has no variables, so the trainable variables are exactly the example's. The
    activations are layers of their own, so the compiled step can read each
    layer's pre-activation output, whose gradient gives per-example gradient norms
    (tapeline/gradients/per_example.py); the computation is the example's.

    Under a mixed `precision` the layers compute in 16 bits and keep float32
    variables; the logits stay float32 so the softmax and loss do not lose range.
    """
    return keras.Sequential(
        [
            keras.Input(shape=IMAGE_SHAPE, dtype=INPUT_DTYPE, name="image"),
            keras.layers.Rescaling(1.0 / 255, name="normalize", dtype=precision),
            keras.layers.Conv2D(32, 3, name="conv", dtype=precision),
            keras.layers.ReLU(name="conv_relu", dtype=precision),
            keras.layers.Flatten(name="flatten", dtype=precision),
            keras.layers.Dense(128, name="dense", dtype=precision),
            keras.layers.ReLU(name="dense_relu", dtype=precision),
            keras.layers.Dense(10, name="logits", dtype="float32"),
        ],
        name="cnn",
    )


def per_example_loss(labels, logits):
    """Each example's loss: the cross-entropy of its label under the softmax of its logits."""
    return keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)


def mean_loss(labels, logits):
    """A batch's loss: the mean of its examples' (what the optimizer minimises, and what evaluation reports)."""
    return keras.ops.mean(per_example_loss(labels, logits))
