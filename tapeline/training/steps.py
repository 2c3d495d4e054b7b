"""The compiled steps: a training step (one device, or a distribution strategy's replicas), its statistics, evaluation.

Each is a small `tf.function` the loop calls once per batch (see tapeline/training/loop.py).
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from tapeline.data.arrays import label_dtype
from tapeline.gradients.per_example import example_columns, packed, per_example_plan
from tapeline.model import mean_loss, per_example_loss


def batch_spec(model: keras.Model) -> tuple[tf.TensorSpec, tf.TensorSpec]:
    """The compiled steps' input signature: a batch of the model's input (as `model.inputs` declares it) and its labels."""
    (image,) = model.inputs
    return tf.TensorSpec([None, *image.shape[1:]], image.dtype), tf.TensorSpec([None], label_dtype(model.output_shape[-1]))


def make_train_step(model, optimizer, loss_metric, accuracy_metric, jit_compile: bool = True, per_example: bool = True) -> Callable:
    """The compiled step: (uint8 images, labels) -> (loss, gradients as tape.gradient returned them, examples or None).

    With XLA the step is one fused program; on CPU most of the gain is Adam, whose
    ten element-wise passes over the 11 MB dense kernel become one. With a
    LossScaleOptimizer (mixed_float16) the tape differentiates the scaled loss;
    the returned gradients are divided back, so they are always the true ones.
    With `per_example`, the same `tape.gradient` also returns the gradients at the
    layers' outputs, from which each example's gradient norms follow: `examples`, a row
    per example (per_example.packed).
    """
    plan = _plan(model) if per_example else None

    @tf.function(input_signature=batch_spec(model), jit_compile=jit_compile)
    def train_step(x, y):
        scale = _loss_scale(optimizer)
        with tf.GradientTape() as tape:
            logits, taps = plan.tapped(x, training=True) if plan else (model(x, training=True), None)
            loss = mean_loss(y, logits)
            scaled_loss = loss if scale is None else loss * scale
        scaled_gradients, output_gradients = _gradients(tape, scaled_loss, model.trainable_variables, taps)
        optimizer.apply_gradients(zip(scaled_gradients, model.trainable_variables))
        gradients = _unscaled(scaled_gradients, scale)
        loss_metric.update_state(loss)
        accuracy_metric.update_state(y, logits)
        if not plan:
            return loss, gradients, None
        batch_size = tf.cast(tf.shape(y)[0], tf.float32)  # the loss is the batch's mean: each example's own is B times its share
        squared_norms = plan.squared_norms(taps, output_gradients, _unscaled([batch_size], scale)[0])
        losses = tf.cast(per_example_loss(y, logits), tf.float32)
        return loss, gradients, packed(example_columns(y, logits, losses), squared_norms)

    return train_step


def make_distributed_train_step(strategy, model, optimizer, loss_metric, accuracy_metric, batch_size: int, per_example: bool = True) -> Callable:
    """The same step on `strategy`'s replicas: (the global batch) -> (loss, gradients, examples or None).

    Every worker gathers the same global batch (calls.py); each replica, on any
    worker, trains on its contiguous slice of it, as tf.data would have split it.
    Each replica's loss is its share of the whole batch's mean loss, so the sum of
    the replicas' gradients, which the optimizer all-reduces and applies, is the
    gradient of the whole batch. That sum is what this step returns and the run
    exports. Each replica computes its own examples' norms; the step gathers them
    in the batch's order. (No XLA here: it does not compile the cross-replica all-reduce.)

    Every step has the same shapes: the batch is padded at its end to `batch_size`
    rounded up to a multiple of the replica count, so each replica's slice has one
    static size. A collective in the call's graph loop keeps the shape of its first
    iteration (TensorFlow 2.21), so the epoch's shorter last batch could not be
    gathered otherwise. Padding rows weigh zero in the loss (their gradient, and so
    their share of every statistic, is exactly zero; the model has no batch
    statistics) and are dropped from the gathered rows: the step is one device's on
    the batch's real examples, and every sample of the epoch is trained on once.
    """
    plan = _plan(model) if per_example else None
    slice_size = -(-batch_size // strategy.num_replicas_in_sync)  # each replica's rows of the padded batch
    padded_size, classes = slice_size * strategy.num_replicas_in_sync, model.output_shape[-1]

    def replica_step(x, y, real, n, scale=None):
        x, y, real = (_replica_slice(rows, slice_size) for rows in (x, y, real))
        with tf.GradientTape() as tape:
            logits, taps = plan.tapped(x, training=True) if plan else (model(x, training=True), None)
            losses = per_example_loss(y, logits)
            loss = tf.reduce_sum(tf.where(real, losses, 0.0)) / tf.cast(n, losses.dtype)  # padding weighs 0
            scaled_loss = loss if scale is None else loss * scale
        scaled_gradients, output_gradients = _gradients(tape, scaled_loss, model.trainable_variables, taps)
        optimizer.apply_gradients(zip(scaled_gradients, model.trainable_variables))
        if not plan:
            return loss, scaled_gradients, logits, (losses,)
        norms = plan.squared_norms(taps, output_gradients, _unscaled([tf.cast(n, tf.float32)], scale)[0])
        return loss, scaled_gradients, logits, (losses, norms)

    @tf.function
    def train_step(x, y):
        scale, n = _loss_scale(optimizer), tf.shape(y)[0]
        padded = (_padded(x, padded_size), _padded(y, padded_size), tf.range(padded_size) < n, n)
        losses, scaled_gradients, logits, examples = strategy.run(replica_step, args=padded if scale is None else (*padded, scale))
        loss = strategy.reduce("sum", losses, axis=None)
        gradients = _unscaled([strategy.reduce("sum", g, axis=None) for g in scaled_gradients], scale)
        # One gather of everything per example, after the reductions: collectives that no data orders
        # may be matched across workers in different orders (multi-worker training).
        with tf.control_dependencies([loss, *gradients]):
            per_example = strategy.gather(strategy.run(_rows, args=(logits, *examples)), axis=0)[:n]  # the real rows
        logits, per_example_loss, squared_norms = tf.split(per_example, [classes, 1, -1], axis=1)
        loss_metric.update_state(loss)
        accuracy_metric.update_state(y, logits)
        if not plan:
            return loss, gradients, None
        return loss, gradients, packed(example_columns(y, logits, per_example_loss[:, 0]), squared_norms)

    return train_step


def _rows(logits: tf.Tensor, *columns: tf.Tensor) -> tf.Tensor:
    """A replica's per-example results as one float32 tensor, a row per example: logits, then its columns."""
    return tf.concat([tf.cast(logits, tf.float32), *(tf.reshape(tf.cast(c, tf.float32), [tf.shape(logits)[0], -1]) for c in columns)], axis=1)


def _padded(batch: tf.Tensor, size: int) -> tf.Tensor:
    """`batch` with zero rows appended up to `size` rows, with that static shape (an error if it has more)."""
    rows = tf.pad(batch, [[0, size - tf.shape(batch)[0]]] + [[0, 0]] * (batch.shape.rank - 1))
    return tf.ensure_shape(rows, [size, *batch.shape[1:]])


def _replica_slice(batch: tf.Tensor, size: int) -> tf.Tensor:
    """This replica's contiguous slice of `size` rows of the padded global batch, with that static shape."""
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    return tf.reshape(batch, [-1, size, *batch.shape[1:]])[replica]


def _plan(model):
    """The model's per-example plan (per_example.py); a ValueError with its reason when the norms are not defined."""
    plan = per_example_plan(model)
    if plan.unsupported:
        raise ValueError(f"per-example gradient norms are not defined for this model: {plan.unsupported}; train with --no-per-example-norms")
    return plan


def _gradients(tape: tf.GradientTape, loss: tf.Tensor, variables: list, taps) -> tuple[list, list]:
    """(the variables' gradients, the gradients at the tapped tensors, `taps.targets`), from one `tape.gradient`."""
    targets = taps.targets if taps else []
    gradients = tape.gradient(loss, [*variables, *targets])
    return gradients[: len(variables)], gradients[len(variables) :]


def _loss_scale(optimizer) -> tf.Tensor | None:
    """The current loss scale under mixed_float16 (the optimizer unscales what it applies); None otherwise.

    None, not 1.0: without loss scaling the step carries no multiply and no divide.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return tf.convert_to_tensor(optimizer.dynamic_scale)
    return None


def _unscaled(gradients: list, scale: tf.Tensor | None) -> list:
    return gradients if scale is None else [g / scale for g in gradients]


def host_arrays(tensors, dtype: str) -> list[np.ndarray]:
    """Host copies in the stored dtype, cast on the device (far faster than numpy's float16 cast: docs/performance.md)."""
    return [tf.cast(t, dtype).numpy() for t in tensors]


def make_eval_step(model, loss_metric, accuracy_metric) -> Callable:
    @tf.function(input_signature=batch_spec(model))
    def eval_step(x, y):
        logits = model(x, training=False)
        # Per-example losses: under a distribution strategy Keras divides a reduced loss by the number of replicas.
        loss_metric.update_state(per_example_loss(y, logits))
        accuracy_metric.update_state(y, logits)

    return eval_step
