"""Many training steps per call from Python: the host acts only at the steps where it must.

A call runs the unchanged compiled step (steps.py) up to k times inside one
`tf.function`, gathering each batch in the graph from the in-memory split by the
epoch's index order (batches.py: a function of (seed, epoch), so a resumed run
continues at the exact batch), and returns each step's loss, statistics and global
norm stacked, with the gradients of its last step. The host knows in advance where
it must act (a snapshot, a checkpoint, an epoch's end: `call_length` ends the call
there); what it cannot know, a non-finite value or a norm spike, the device decides
(`AnomalyWatch`) and ends the call early at that step, so its gradients are the
ones returned.

Under a distribution strategy a call is one step fed by the strategy's distributed
dataset (`DatasetCalls`): the same results, k = 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tapeline.gradients.recorder import SnapshotPolicy
from tapeline.gradients.schema import L2_NORM, NON_FINITE_COUNTS, STAT_NAMES, global_norm
from tapeline.gradients.stats import gradient_stats
from tapeline.training.batches import epoch_batches

NORM_WINDOW = 100  # the running median's window, as SnapshotPolicy's
MIN_NORMS = 10  # finite steps seen before a spike can be called one, as SnapshotPolicy's


class CallResult(NamedTuple):
    """What a call ran, on the host: one entry per step, and the gradients of its last step (on the device)."""

    losses: np.ndarray  # [steps]
    stats: np.ndarray  # [steps, variables, STAT_NAMES]
    norms: np.ndarray  # [steps] the global gradient norm, float64, as the device decided on it
    gradients: list


def call_length(step: int, k: int, epoch_end: int, checkpoint_every: int, policy: SnapshotPolicy, snapshot_weights: bool) -> int:
    """How many steps the call after `step` runs: at most k, ending at the first step after which the host acts.

    The host acts after an epoch's end, a checkpoint step and a scheduled snapshot
    (it needs that step's gradients, which a call returns for its last step only);
    with `snapshot_weights` also before a scheduled step (its weights are read
    before it runs), so the call ends just before that step, which then runs alone.
    """
    last = min(step + k, epoch_end, (step // checkpoint_every + 1) * checkpoint_every)
    for candidate in range(step + 1, last + 1):
        if policy.scheduled(candidate):
            last = candidate - 1 if snapshot_weights and candidate > step + 1 else candidate
            break
    return last - step


class AnomalyWatch:
    """The device's copy of the recorder's rule for ending a call: a non-finite value, or a norm spike.

    The same rule as `non_finite_values` and `SnapshotPolicy.reason`, on the same
    numbers: the global norm is computed here in float64 and handed to the
    recorder, and the running window of finite norms lives in variables, so the
    device and the host always agree on which step was anomalous.
    """

    def __init__(self, spike_factor: float, loss_scaled: bool, window: int = NORM_WINDOW):
        self.spike_factor, self.loss_scaled, self.window = spike_factor, loss_scaled, window
        self.norms = tf.Variable(tf.zeros([window], tf.float64), trainable=False)
        self.seen = tf.Variable(0, dtype=tf.int64, trainable=False)

    def __call__(self, loss: tf.Tensor, stats: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        """(the step's global norm, whether the step ends the call); appends a finite step's norm to the window."""
        norm = tf.sqrt(tf.reduce_sum(tf.square(tf.cast(stats[:, L2_NORM], tf.float64))))
        finite = tf.math.is_finite(loss)
        if not self.loss_scaled:  # under loss scaling an overflowing gradient is skipped by the optimizer, not fatal
            finite &= tf.reduce_all(stats[:, NON_FINITE_COUNTS] == 0)
        seen = tf.minimum(self.seen, self.window)
        spike = finite & tf.cond(seen >= MIN_NORMS, lambda: norm > self.spike_factor * _median(self.norms[:seen]), lambda: False)
        with tf.control_dependencies([spike]):
            appended = tf.cond(finite, lambda: self._append(norm), lambda: tf.constant(True))
        with tf.control_dependencies([appended]):
            return tf.identity(norm), ~finite | spike

    def _append(self, norm: tf.Tensor) -> tf.Tensor:
        self.norms.scatter_nd_update([[self.seen % self.window]], [norm])
        self.seen.assign_add(1)
        return tf.constant(True)


def _median(values: tf.Tensor) -> tf.Tensor:
    """numpy's median: the middle value, or the mean of the two middle ones; NaN if any value is NaN."""
    ordered = tf.sort(values)
    n = tf.size(values)
    middle = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2.0
    return tf.where(tf.reduce_any(tf.math.is_nan(values)), tf.constant(np.nan, tf.float64), middle)


def norms_only(gradients) -> tf.Tensor:
    """Statistics off (benchmarks/train_speed.py measures what they cost): only the L2 norms, for the anomaly watch; other columns 0.

    The watch then sees the loss and the norm: a norm spike still ends a call, but a
    non-finite gradient under a finite loss is not caught (its counts are not computed).
    """
    norms = tf.stack([tf.sqrt(2.0 * tf.nn.l2_loss(tf.cast(g, tf.float32))) for g in gradients])
    return tf.pad(norms[:, None], [[0, 0], [L2_NORM, len(STAT_NAMES) - 1 - L2_NORM]])


def make_step_calls(train_step: Callable, variables: list, images: tf.Tensor, labels: tf.Tensor, batch_size: int, watch: AnomalyWatch, stats: bool = True):
    """The compiled call: (epoch order, first batch, steps) -> (losses, stats, norms, last gradients), stacked per step.

    `train_step(images, labels) -> (loss, gradients)` runs as compiled (XLA); the
    batches are gathered here, in the graph, and the loop, the statistics and the
    anomaly watch run as a TensorFlow graph (XLA would run the statistics' reductions
    single-threaded: docs/performance.md). One iteration at a time: each step reads
    the weights the previous one wrote. `stats=False`: `norms_only` instead of the statistics.
    """
    step_statistics = gradient_stats if stats else norms_only

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)])
    def run_steps(order, first_batch, count):
        def body(i, stop, losses, stats, norms, gradients):
            start = (first_batch + i) * batch_size
            batch = order[start : start + batch_size]  # the epoch's last batch may be shorter
            loss, step_gradients = train_step(tf.gather(images, batch), tf.gather(labels, batch))
            step_stats = step_statistics(step_gradients)
            norm, stop = watch(loss, step_stats)
            return i + 1, stop, losses.write(i, loss), stats.write(i, step_stats), norms.write(i, norm), list(step_gradients)

        start = (
            tf.constant(0), tf.constant(False),
            tf.TensorArray(tf.float32, size=0, dynamic_size=True), tf.TensorArray(tf.float32, size=0, dynamic_size=True),
            tf.TensorArray(tf.float64, size=0, dynamic_size=True), [tf.zeros(v.shape, tf.float32) for v in variables],
        )  # fmt: skip
        _, _, losses, stats, norms, gradients = tf.while_loop(
            lambda i, stop, *_: (i < count) & ~stop, body, start, parallel_iterations=1
        )
        return losses.stack(), stats.stack(), norms.stack(), gradients

    return run_steps


class StepCalls:
    """One device: each call runs up to k steps in one `tf.function` (see `make_step_calls`)."""

    def __init__(
        self, train_step: Callable, variables: list, images: tf.Tensor, labels: tf.Tensor, batch_size: int, watch: AnomalyWatch, k: int, stats: bool = True
    ):
        self.k, self.watch = k, watch
        self._run = make_step_calls(train_step, variables, images, labels, batch_size, watch, stats)
        self._order = None

    def start_epoch(self, order: np.ndarray, first_batch: int) -> None:
        self._order = tf.constant(order, tf.int32)  # on the device once an epoch, read by every call

    def __call__(self, batch: int, count: int) -> CallResult:
        losses, stats, norms, gradients = self._run(self._order, tf.constant(batch, tf.int32), tf.constant(count, tf.int32))
        return CallResult(losses.numpy(), stats.numpy(), norms.numpy(), gradients)


class DatasetCalls:
    """Under a distribution strategy: a call is one step, fed by the strategy's distributed dataset (k = 1).

    `step_with_stats(x, y) -> (loss, gradients, stats)` (steps.with_stats); the host
    applies the recorder's rule itself, since each call holds a single step.
    """

    k = 1

    def __init__(self, step_with_stats: Callable, images: tf.Tensor, labels: tf.Tensor, batch_size: int, strategy):
        self._step, self._images, self._labels, self._batch_size, self._strategy = step_with_stats, images, labels, batch_size, strategy
        self._batches = None

    def start_epoch(self, order: np.ndarray, first_batch: int) -> None:
        self._batches = iter(epoch_batches(self._images, self._labels, order, self._batch_size, first_batch, self._strategy))

    def __call__(self, batch: int, count: int) -> CallResult:
        loss, gradients, stats = self._step(*next(self._batches))
        stats = stats.numpy()
        return CallResult(np.array([float(loss)]), stats[None], np.array([global_norm(stats)]), gradients)
