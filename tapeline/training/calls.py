"""Many training steps per call from Python: the host acts only at the steps where it must.

A call runs the unchanged compiled step (steps.py) up to k times inside one
`tf.function`, gathering each batch in the graph from the in-memory split by the
epoch's index order (batches.py: a function of (seed, epoch), so a resumed run
continues at the exact batch), and returns each step's values, by their `steps/`
column names (schema.STEP_COLUMNS), and statistics stacked, with the gradients of
its last step. The host knows in advance where it must act (a snapshot, a
checkpoint, an epoch's end: `call_length` ends the call there); what it cannot
know, a non-finite value or a norm spike, the device decides (`AnomalyWatch`) and
ends the call early at that step, so its gradients are the ones returned.

Under a distribution strategy the call is the same: the step it runs hands each
replica its slice of the global batch (steps.make_distributed_train_step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from tapeline.gradients.noise import noise_estimates
from tapeline.gradients.recorder import MIN_NORMS, NORM_WINDOW, SnapshotPolicy
from tapeline.gradients.schema import L2_NORM, NON_FINITE_COUNTS, Examples
from tapeline.gradients.stats import gradient_stats

# The per-step values the call computes on the device, by their `steps/` column (schema.STEP_COLUMNS): each a
# function of the step's (loss, gradients, examples: its packed per-example rows, per_example.packed, or None)
# to a scalar, returned as float64 and stored in its column's type. Beside these the call returns the global norm
# (the anomaly watch's) and the host adds the noise estimates (noise.noise_estimates). A new one is an entry here.
STEP_VALUES: dict[str, Callable] = {"loss": lambda loss, gradients, examples: loss}


class CallResult(NamedTuple):
    """What a call ran, on the host: one entry per step, and the gradients of its last step (on the device)."""

    values: dict[str, np.ndarray]  # by `steps/` column, each [steps]; global_norm float64, as the device decided on it
    stats: np.ndarray  # [steps, variables, STAT_NAMES]
    gradients: list
    examples: Examples | None  # numpy, one row per example of the call's steps in order; None without per-example norms

    @property
    def steps(self) -> int:
        return len(self.stats)


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
        self.norms.assign(tf.tensor_scatter_nd_update(self.norms, [[self.seen % self.window]], [norm]))
        self.seen.assign_add(1)
        return tf.constant(True)


def _median(values: tf.Tensor) -> tf.Tensor:
    """numpy's median: the middle value, or the mean of the two middle ones; NaN if any value is NaN."""
    ordered = tf.sort(values)
    n = tf.size(values)
    middle = (ordered[(n - 1) // 2] + ordered[n // 2]) / 2.0
    return tf.where(tf.reduce_any(tf.math.is_nan(values)), tf.constant(np.nan, tf.float64), middle)


def make_step_calls(
    train_step: Callable, variables: list, images: tf.Tensor, labels: tf.Tensor, batch_size: int, watch: AnomalyWatch,
    per_example: bool,
):  # fmt: skip
    """The compiled call: (epoch order, first batch, steps) -> (per-step values, statistics, per-example results, last gradients).

    `train_step(images, labels) -> (loss, gradients, examples or None)` runs as
    compiled (XLA); the batches are gathered here, in the graph, and the loop, the
    statistics and the anomaly watch run as a TensorFlow graph
    (XLA would run the statistics' reductions single-threaded: docs/performance.md).
    One iteration at a time: each step reads the weights the previous one wrote.
    Per-step results are stacked; per-example ones concatenated (a last batch may be shorter).
    """

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int32), tf.TensorSpec([], tf.int32), tf.TensorSpec([], tf.int32)])
    def run_steps(order, first_batch, count):
        def body(i, stop, values, stats, examples, gradients):
            start = (first_batch + i) * batch_size
            batch = order[start : start + batch_size]  # the epoch's last batch may be shorter
            loss, step_gradients, step_examples = train_step(tf.gather(images, batch), tf.gather(labels, batch))
            step_stats = gradient_stats(step_gradients)
            norm, stop = watch(loss, step_stats)
            step_values = {name: tf.cast(value(loss, step_gradients, step_examples), tf.float64) for name, value in STEP_VALUES.items()}
            values = {name: values[name].write(i, value) for name, value in (step_values | {"global_norm": norm}).items()}
            examples = [array.write(i, step_examples) for array in examples]
            return i + 1, stop, values, stats.write(i, step_stats), examples, list(step_gradients)

        start = (
            tf.constant(0), tf.constant(False),
            {name: tf.TensorArray(tf.float64, size=0, dynamic_size=True) for name in (*STEP_VALUES, "global_norm")},
            tf.TensorArray(tf.float32, size=0, dynamic_size=True),
            [tf.TensorArray(tf.float32, size=0, dynamic_size=True, infer_shape=False)] if per_example else [],
            [tf.zeros(v.shape, tf.float32) for v in variables],
        )  # fmt: skip
        _, _, values, stats, examples, gradients = tf.while_loop(lambda i, stop, *_: (i < count) & ~stop, body, start, parallel_iterations=1)
        return {name: array.stack() for name, array in values.items()}, stats.stack(), [array.concat() for array in examples], gradients

    return run_steps


def host_call_result(values: dict, stats: tf.Tensor, examples: list[tf.Tensor], gradients: list, sizes: np.ndarray) -> CallResult:
    """A call's results read to the host (the one sync per call), and each step's noise estimated from them.

    `sizes`: each step's batch size. The estimates are a few numbers per step from what
    the device computed: on the host, a graph op per step would cost more than the arithmetic.
    """
    values, stats = {name: t.numpy() for name, t in values.items()}, stats.numpy()
    if not examples:
        return CallResult(values, stats, gradients, None)
    rows = Examples.from_rows(examples[0].numpy())
    noise = noise_estimates(rows.squared_norms.sum(axis=1, dtype=np.float64), sizes[: len(stats)], np.square(values["global_norm"]))
    return CallResult(values | noise, stats, gradients, rows)


class StepCalls:
    """One device: each call runs up to k steps in one `tf.function` (see `make_step_calls`)."""

    def __init__(
        self, train_step: Callable, variables: list, images: tf.Tensor, labels: tf.Tensor, batch_size: int, watch: AnomalyWatch, k: int,
        per_example: bool,
    ):  # fmt: skip
        self.k, self.watch = k, watch
        self._run = make_step_calls(train_step, variables, images, labels, batch_size, watch, per_example)
        self._batch_size, self._order, self._samples = batch_size, None, 0

    def start_epoch(self, order: np.ndarray, first_batch: int) -> None:
        self._order, self._samples = tf.constant(order, tf.int32), len(order)  # on the device once an epoch, read by every call

    def __call__(self, batch: int, count: int) -> CallResult:
        values, stats, examples, gradients = self._run(self._order, tf.constant(batch, tf.int32), tf.constant(count, tf.int32))
        starts = np.arange(batch, batch + count) * self._batch_size
        return host_call_result(values, stats, examples, gradients, np.minimum(self._batch_size, self._samples - starts))
