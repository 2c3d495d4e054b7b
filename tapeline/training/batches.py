"""The data order: an epoch's order is a function of (seed, epoch) alone, so a step's batch is known on the host."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

# Shard by element, not by file: each worker takes its replicas' slices of every global batch
# (tf.distribute rebatches it into one slice per replica), so a step's global batch is a single worker's.
SHARD_BY_DATA = tf.data.Options()
SHARD_BY_DATA.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits the training split: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(images: tf.Tensor, labels: tf.Tensor, order: np.ndarray, batch_size: int, skip: int = 0) -> tf.data.Dataset:
    """Batches of (uint8 images, labels) in `order` from batch `skip` on: index batches gathered in one op, prefetched."""
    return (
        tf.data.Dataset.from_tensor_slices(order[skip * batch_size :])
        .batch(batch_size)
        .map(lambda idx: (tf.gather(images, idx), tf.gather(labels, idx)), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def epoch_batches(images: tf.Tensor, labels: tf.Tensor, order: np.ndarray, batch_size: int, skip: int, strategy=None):
    """`batches`; under a distribution strategy, each replica, on any worker, takes its slice of every global batch."""
    dataset = batches(images, labels, order, batch_size, skip)
    return strategy.experimental_distribute_dataset(dataset.with_options(SHARD_BY_DATA)) if strategy else dataset


def batch_sample_ids(sample_ids: np.ndarray, order: np.ndarray, batch: int, batch_size: int) -> np.ndarray:
    """The `sample_id`s of the epoch's `batch`-th batch, known on the host without asking TensorFlow."""
    return sample_ids[order[batch * batch_size : (batch + 1) * batch_size]]
