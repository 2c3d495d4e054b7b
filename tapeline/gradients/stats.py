"""The per-step gradient statistics, computed on the device: one row per variable, columns STAT_NAMES (see schema.py)."""

from __future__ import annotations

import tensorflow as tf


@tf.function  # a TensorFlow graph, not XLA: XLA's CPU reductions run single-threaded (docs/performance.md)
def gradient_stats(gradients) -> tf.Tensor:
    """[variables, STAT_NAMES]: l2_norm, mean, std, max_abs, zero_fraction, nan and inf counts.

    Runs on the device, right after the step, on the gradients it returned: no
    gradient moves to the host. Memory-bound: five reads of each tensor (sum, sum
    of squares, max, min, zeros), and only the zero count writes temporaries
    (`zero_count`). The NaN and Inf counts take two more reads of each tensor only
    when the sums say some gradient is not finite; a NaN or Inf also shows in the
    float statistics. The arithmetic on the sums runs once for all variables: on the
    small ones, op dispatch costs more than the reading.
    """
    flat = [tf.reshape(tf.cast(g, tf.float32), [-1]) for g in gradients]
    size = tf.constant([g.shape.num_elements() for g in flat], tf.float32)
    total = tf.stack([tf.reduce_sum(g) for g in flat])
    squares = tf.stack([2.0 * tf.nn.l2_loss(g) for g in flat])  # l2_loss: sum(g**2) / 2 in one pass, no g*g
    max_abs = tf.stack([tf.maximum(tf.reduce_max(g), -tf.reduce_min(g)) for g in flat])  # without writing |g|
    zeros = tf.stack([zero_count(g) for g in flat])
    counts = tf.cond(
        tf.reduce_all(tf.math.is_finite(total + squares)),
        lambda: tf.zeros([len(flat), 2]),
        lambda: tf.stack([[tf.reduce_sum(tf.cast(tf.math.is_nan(g), tf.float32)), tf.reduce_sum(tf.cast(tf.math.is_inf(g), tf.float32))] for g in flat]),
    )
    mean = total / size
    std = tf.sqrt(tf.maximum(squares / size - mean * mean, 0.0))
    return tf.concat([tf.stack([tf.sqrt(squares), mean, std, max_abs, zeros / size], axis=1), counts], axis=1)


def zero_count(flat: tf.Tensor) -> tf.Tensor:
    """How many values of a flat tensor are 0 (or -0), exactly, as float32, with 1-byte temporaries only.

    TensorFlow has no op that counts without a mask. The boolean mask is cast to
    uint8 (a float32 cast writes four times the bytes and was the costliest part of
    the statistics: benchmarks/gradient_stats.py), summed in uint8 over rows of at
    most 255 values (so no row overflows), then the row counts in int32.
    """
    n = flat.shape.num_elements()
    width = next(w for w in range(min(255, max(n, 1)), 0, -1) if n % w == 0)  # a divisor of n: rows without padding
    rows = tf.reduce_sum(tf.reshape(tf.cast(tf.equal(flat, 0.0), tf.uint8), [-1, width]), axis=1)
    return tf.cast(tf.reduce_sum(tf.cast(rows, tf.int32)), tf.float32)
