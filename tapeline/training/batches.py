"""The data order: an epoch's order is a function of (seed, epoch) alone, so a step's batch is known on the host."""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits the training split: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(images: tf.Tensor, labels: tf.Tensor, order: np.ndarray, batch_size: int, skip: int = 0) -> tf.data.Dataset:
    """Batches of (uint8 images, labels) in `order` from batch `skip` on, as a `tf.data` pipeline, prefetched.

    Not the training path (calls.py gathers each batch in the graph): the benchmarks' reference loops.
    """
    return (
        tf.data.Dataset.from_tensor_slices(order[skip * batch_size :])
        .batch(batch_size)
        .map(lambda idx: (tf.gather(images, idx), tf.gather(labels, idx)), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def batch_sample_ids(sample_ids: np.ndarray, order: np.ndarray, batch: int, batch_size: int) -> np.ndarray:
    """The `sample_id`s of the epoch's `batch`-th batch, known on the host without asking TensorFlow."""
    return sample_ids[order[batch * batch_size : (batch + 1) * batch_size]]
