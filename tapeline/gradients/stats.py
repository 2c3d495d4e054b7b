"""The per-step gradient statistics, computed on the device: one row per variable, columns STAT_NAMES (see schema.py)."""

from __future__ import annotations

import tensorflow as tf


@tf.function  # a TensorFlow graph, not XLA: XLA's CPU reductions run single-threaded (docs/performance.md)
def gradient_stats(gradients) -> tf.Tensor:
    """[variables, STAT_NAMES]: l2_norm, mean, std, max_abs, zero_fraction, nan and inf counts.

    Runs on the device, right after the step, on the gradients it returned: no
    gradient moves to the host. Memory-bound: five reads of each tensor (sum, sum
    of squares, max, min, zeros), and only the zero count writes temporaries (a
    boolean mask and its float32 cast: TensorFlow has no op that counts without
    them). The NaN and Inf counts take two more reads of each tensor only when the
    sums say some gradient is not finite; a NaN or Inf also shows in the float
    statistics. The arithmetic on the sums runs once for all variables: on the
    small ones, op dispatch costs more than the reading.
    """
    flat = [tf.reshape(tf.cast(g, tf.float32), [-1]) for g in gradients]
    size = tf.constant([g.shape.num_elements() for g in flat], tf.float32)
    total = tf.stack([tf.reduce_sum(g) for g in flat])
    squares = tf.stack([2.0 * tf.nn.l2_loss(g) for g in flat])  # l2_loss: sum(g**2) / 2 in one pass, no g*g
    max_abs = tf.stack([tf.maximum(tf.reduce_max(g), -tf.reduce_min(g)) for g in flat])  # without writing |g|
    zeros = tf.stack([tf.reduce_sum(tf.cast(tf.equal(g, 0.0), tf.float32)) for g in flat])
    counts = tf.cond(
        tf.reduce_all(tf.math.is_finite(total + squares)),
        lambda: tf.zeros([len(flat), 2]),
        lambda: tf.stack([[tf.reduce_sum(tf.cast(tf.math.is_nan(g), tf.float32)), tf.reduce_sum(tf.cast(tf.math.is_inf(g), tf.float32))] for g in flat]),
    )
    mean = total / size
    std = tf.sqrt(tf.maximum(squares / size - mean * mean, 0.0))
    return tf.concat([tf.stack([tf.sqrt(squares), mean, std, max_abs, zeros / size], axis=1), counts], axis=1)
