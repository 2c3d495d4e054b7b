"""Per-example gradient norms inside the compiled step, without forming per-example gradients.

For a layer y = a·W + b, example i's own gradient of its loss ℓᵢ is the outer
product aᵢᵀδᵢ, with δᵢ = ∂ℓᵢ/∂yᵢ: its norm is ‖aᵢ‖·‖δᵢ‖, and the bias's is ‖δᵢ‖.
A convolution's is Pᵢᵀδᵢ, Pᵢ the example's input patches (676 × 9 by 676 × 32 for
the model's 3 × 3 kernel): small enough to form per example. The δ come from the
tape that already differentiates the batch loss: the layers' outputs are extra
targets of the one `tape.gradient`, scaled back from the batch mean to each
example's own loss.

From these norms and the batch gradient's, the host estimates the gradient noise of
each step (tapeline/gradients/noise.py).
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tapeline.gradients.schema import EXAMPLE_COLUMNS


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
    patches = _patches(layer, a, d.shape[1], d.shape[2])
    d = tf.reshape(d, [tf.shape(d)[0], -1, d.shape[-1]])
    kernel = tf.matmul(patches, d, transpose_a=True)  # [B, kh·kw·channels, filters]: the example's kernel gradient
    return [tf.reduce_sum(tf.square(kernel), axis=[1, 2]), tf.reduce_sum(tf.square(tf.reduce_sum(d, axis=1)), axis=-1)]


def _patches(layer, a: tf.Tensor, height: int, width: int) -> tf.Tensor:
    """[B, height·width, kh·kw·channels]: each output position's input patch, one strided slice per kernel offset.

    Slices and one concatenation, not `tf.image.extract_patches`: on this CPU under
    XLA the product that follows runs twice as fast on this layout (docs/performance.md).
    """
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.strides, layer.dilation_rate
    if layer.padding == "same":  # as TensorFlow pads: the odd pixel after
        rows, cols = (max((n - 1) * s + (k - 1) * r + 1 - size, 0) for n, s, k, r, size in ((height, sh, kh, dh, a.shape[1]), (width, sw, kw, dw, a.shape[2])))
        a = tf.pad(a, [[0, 0], [rows // 2, rows - rows // 2], [cols // 2, cols - cols // 2], [0, 0]])
    views = [
        a[:, i * dh : i * dh + (height - 1) * sh + 1 : sh, j * dw : j * dw + (width - 1) * sw + 1 : sw, :]
        for i in range(kh) for j in range(kw)
    ]  # fmt: skip
    return tf.reshape(tf.concat(views, axis=-1), [tf.shape(a)[0], height * width, -1])


def example_columns(labels: tf.Tensor, logits: tf.Tensor, losses: tf.Tensor) -> dict[str, tf.Tensor]:
    """The step's EXAMPLE_COLUMNS (schema.py), each [B], from what it already has: the labels, the logits it
    trained on (before the update) and each example's own loss. O(B·classes): nothing the step did not compute."""
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    given = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)
    label_logit = tf.reduce_sum(tf.where(given, logits, 0.0), axis=-1)
    other = tf.reduce_max(tf.where(given, logits.dtype.min, logits), axis=-1)  # the largest logit of another class
    p_label = tf.reduce_sum(tf.where(given, tf.nn.softmax(logits), 0.0), axis=-1)
    return {
        "label": labels, "predicted": predicted, "loss": losses, "correct": tf.equal(predicted, labels),
        "margin": label_logit - other, "p_label": p_label,
    }  # fmt: skip


def packed(columns: dict[str, tf.Tensor], squared_norms: tf.Tensor) -> tf.Tensor:
    """[B, len(EXAMPLE_COLUMNS) + variables] float32, a row per example: `columns` in EXAMPLE_COLUMNS' order, then
    the squared norms (schema.Examples.from_rows reads it back).

    One tensor out of the step, not one per column: each output of the compiled step is
    another array the k-step loop writes and concatenates every step.
    """
    scalars = [tf.cast(columns[name], tf.float32) for name in EXAMPLE_COLUMNS]  # labels and classes < 2²⁴: exact
    return tf.concat([tf.stack(scalars, axis=1), tf.cast(squared_norms, tf.float32)], axis=1)
