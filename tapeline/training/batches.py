"""The data order: an epoch's order is a function of (seed, epoch) alone, so a step's batch is known on the host."""

from __future__ import annotations

import numpy as np


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits the training split: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_sample_ids(sample_ids: np.ndarray, order: np.ndarray, batch: int, batch_size: int) -> np.ndarray:
    """The `sample_id`s of the epoch's `batch`-th batch, known on the host without asking TensorFlow."""
    return sample_ids[order[batch * batch_size : (batch + 1) * batch_size]]
