"""Models of one's own, as `--model` takes them: `examples/models.py:simple_model` (or `examples.models:simple_model`
when this directory's parent is on the import path).

Each builder is called as `builder(input_shape, num_classes)` and returns a Keras model that takes the dataset's
images as stored (uint8, `input_shape`) and returns `num_classes` logits.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras.layers import Conv2D, Dense, Flatten


@keras.saving.register_keras_serializable(package="examples")
class SimpleModel(tf.keras.Model):
    """The model of TensorFlow's tf.GradientTape example, as written there."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv1 = Conv2D(32, 3, activation="relu")
        self.flatten = Flatten()
        self.d1 = Dense(128, activation="relu")
        self.d2 = Dense(10)

    def call(self, x):
        x = self.conv1(x)
        x = self.flatten(x)
        x = self.d1(x)
        return self.d2(x)


def simple_model(input_shape, num_classes):
    """The example's SimpleModel behind `Rescaling(1/255)`: the example fed it pixels divided by 255."""
    inputs = keras.Input(input_shape, dtype="uint8")
    outputs = SimpleModel()(keras.layers.Rescaling(1 / 255)(inputs))
    return keras.Model(inputs, outputs)


def small_convnet(input_shape, num_classes):
    """A Functional model for RGB images: a strided `same` convolution, a depthwise one, layer norm and pooling."""
    inputs = keras.Input(input_shape, dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = Conv2D(16, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.LayerNormalization()(x)
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, Dense(num_classes)(x))


def row_gru(input_shape, num_classes):
    """A GRU reading the image row by row (its per-example norms take the general fallback)."""
    height, width, channels = input_shape
    inputs = keras.Input(input_shape, dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Reshape((height, width * channels))(x)
    x = keras.layers.GRU(32)(x)
    return keras.Model(inputs, Dense(num_classes)(x))
