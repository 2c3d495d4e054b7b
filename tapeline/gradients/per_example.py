"""Per-example gradient norms inside the compiled step, without per-example gradients, and the gradient noise they measure.

For a layer y = a·W + b, example i's own gradient of its loss ℓᵢ is the outer
product aᵢᵀδᵢ, with δᵢ = ∂ℓᵢ/∂yᵢ: its norm is ‖aᵢ‖·‖δᵢ‖, and the bias's is ‖δᵢ‖.
A convolution's is Pᵢᵀδᵢ, Pᵢ the example's input patches (676 × 9 by 676 × 32 for
the model's 3 × 3 kernel): small enough to form per example. The δ come from the
tape that already differentiates the batch loss: the layers' outputs are extra
targets of the one `tape.gradient`, scaled back from the batch mean to each
example's own loss.

The noise estimates follow McCandlish et al. 2018, *An Empirical Model of
Large-Batch Training*, appendix A, with B_small = 1 and B_big = B (formulas:
docs/data-format.md#samples).
"""

from __future__ import annotations

import keras
import tensorflow as tf


class TappedModel:
    """A Sequential model run layer by layer, keeping each Dense and Conv2D layer's input and output.

    The model's activations must be layers of their own (see tapeline/model.py), so
    a kept output is the layer's pre-activation, whose gradient is δ.
    """

    def __init__(self, model: keras.Model):
        self.model = model
        self.tapped = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense | keras.layers.Conv2D)]
        for layer in self.tapped:
            if layer.activation not in (None, keras.activations.linear):
                raise ValueError(f"layer {layer.name}: per-example norms need its activation as a layer of its own")
            if isinstance(layer, keras.layers.Conv2D) and (layer.data_format != "channels_last" or layer.groups != 1):
                raise ValueError(f"layer {layer.name}: per-example norms support channels-last Conv2D without groups")
        covered = [v.path for layer in self.tapped for v in _layer_variables(layer)]
        if sorted(covered) != sorted(v.path for v in model.trainable_variables):
            raise ValueError(f"per-example norms cover Dense and Conv2D layers only; the model trains {model.trainable_variables}")
        # For each tapped variable, its column in the model's order of trainable variables.
        order = [v.path for v in model.trainable_variables]
        self._columns = [order.index(path) for path in covered]

    def __call__(self, x: tf.Tensor, training: bool) -> tuple[tf.Tensor, list[tuple[tf.Tensor, tf.Tensor]]]:
        """(logits, [(input, output) of each tapped layer]); the same computation as `model(x, training)`."""
        taps = []
        for layer in self.model.layers:
            y = layer(x, training=training)
            if layer in self.tapped:
                taps.append((x, y))
            x = y
        return x, taps

    def squared_norms(self, taps: list, output_gradients: list, per_example_scale: tf.Tensor) -> tf.Tensor:
        """[B, variables]: each example's squared gradient norm per variable, in the model's order.

        `output_gradients`: the tape's gradients of the loss it differentiated with respect to
        each tap's output; `per_example_scale` turns them into each example's own
        (B for a batch-mean loss, divided by the loss scale when there is one).
        """
        columns = []
        for layer, (inputs, _), delta in zip(self.tapped, taps, output_gradients):
            a, d = tf.cast(inputs, tf.float32), tf.cast(delta, tf.float32) * per_example_scale
            norms = _conv_squared_norms(layer, a, d) if isinstance(layer, keras.layers.Conv2D) else _dense_squared_norms(a, d)
            columns += norms[: len(_layer_variables(layer))]
        by_variable = sorted(zip(self._columns, columns), key=lambda column: column[0])
        return tf.stack([column for _, column in by_variable], axis=1)


def _layer_variables(layer) -> list:
    return [layer.kernel] + ([layer.bias] if layer.use_bias else [])


def _dense_squared_norms(a: tf.Tensor, d: tf.Tensor) -> list[tf.Tensor]:
    """(kernel, bias): ‖aᵢ‖²·‖δᵢ‖² and ‖δᵢ‖², for inputs [B, n] and output gradients [B, m]."""
    if a.shape.rank != 2:
        raise ValueError(f"per-example norms support Dense layers on [batch, features] inputs, not {a.shape}")
    d_squared = tf.reduce_sum(tf.square(d), axis=-1)
    return [tf.reduce_sum(tf.square(a), axis=-1) * d_squared, d_squared]


def _conv_squared_norms(layer, a: tf.Tensor, d: tf.Tensor) -> list[tf.Tensor]:
    """(kernel, bias): ‖Pᵢᵀδᵢ‖² with Pᵢ the example's patches [positions, kh·kw·channels], and ‖Σ_positions δᵢ‖²."""
    kh, kw = layer.kernel_size
    patches = tf.image.extract_patches(
        a, sizes=[1, kh, kw, 1], strides=[1, *layer.strides, 1], rates=[1, *layer.dilation_rate, 1], padding=layer.padding.upper()
    )
    batch = tf.shape(a)[0]
    patches = tf.reshape(patches, [batch, -1, kh * kw * a.shape[-1]])
    d = tf.reshape(d, [batch, -1, d.shape[-1]])
    kernel = tf.einsum("bpk,bpc->bkc", patches, d)
    return [tf.reduce_sum(tf.square(kernel), axis=[1, 2]), tf.reduce_sum(tf.square(tf.reduce_sum(d, axis=1)), axis=-1)]


def gradient_noise(squared_norms: tf.Tensor, batch_gradient_squared: tf.Tensor) -> tf.Tensor:
    """[tr Σ, ‖𝒢‖², B_simple] of one step, float32; NaN for a batch of one.

    m = mean ‖gᵢ‖² over the batch, ‖G‖² = the batch gradient's squared norm:
    tr Σ ≈ (m − ‖G‖²)/(1 − 1/B), ‖𝒢‖² ≈ (B‖G‖² − m)/(B − 1), B_simple = tr Σ / ‖𝒢‖².
    The differences are taken in float64: with little noise they nearly cancel.
    """
    per_example = tf.reduce_sum(tf.cast(squared_norms, tf.float64), axis=1)
    b = tf.cast(tf.shape(per_example)[0], tf.float64)
    m, g = tf.reduce_mean(per_example), tf.cast(batch_gradient_squared, tf.float64)
    variance = tf.math.divide_no_nan(m - g, 1.0 - 1.0 / b)
    signal = tf.math.divide_no_nan(b * g - m, b - 1.0)
    noise = tf.stack([variance, signal, variance / signal])
    return tf.cast(tf.where(b > 1.0, noise, tf.constant(float("nan"), tf.float64)), tf.float32)
