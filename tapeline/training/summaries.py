"""Everything a run writes to TensorBoard (`runs/<id>/tensorboard/`), and its tags.

    step/loss, step/grad_norm                 every 10th step: the batch loss, the global gradient norm
    step/noise_scale_smoothed                 every 10th step: the gradient noise scale, EMA(tr Σ) / EMA(‖𝒢‖²)
                                              (tapeline/gradients/noise.py)
    step/noise_scale_raw                      every 10th step: the step's own B_simple, as estimated (≤ 0 at many steps)
                                              (the step/ tags of `steps/` columns: schema.STEP_COLUMNS names them)
    gradients/<variable path>                 histogram of the variable's gradient values, at every full snapshot
    epoch/train_loss, train_accuracy,         at each epoch's last step
      val_loss, val_accuracy, learning_rate
    epoch/example_grad_norms                  histogram of the epoch's per-example gradient norms
    metrics/<name>                            final metrics written after training (`write_run_metrics`: test_accuracy,
                                              noise_scale_smoothed_median_last_epoch, …)
    the HParams dashboard                     the run's parameters (HPARAMS) and final metrics (METRICS)

Point TensorBoard at `<storage>/runs` and every run is one row of the HParams table,
its session named after the run. Every run declares the same experiment (the
parameters and metrics below; TensorBoard takes the first declaration it finds), so
the table's columns are chosen here, not inferred from every scalar tag. A metric's
value is the last one of its scalar tag: the epoch scalars double as the final train
and validation metrics.

B_simple is noisy from step to step (each step sees one batch, and its two
estimates are differences that can come out negative); the smoothed curve is
`NoiseSmoother` of tapeline/gradients/noise.py, as the steps come. Its median over the
last epoch is run.json's `noise_scale_smoothed_median_last_epoch`, written again as a
`metrics/` tag: the HParams dashboard's noise scale. Each scalar's description
(TensorBoard shows it beside the chart) says which statistic it is.

A worker that does not write (not the chief of multi-worker training) gets a
`RunSummaries` that writes nothing and computes nothing.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import tensorflow as tf
from tensorboard.plugins.histogram import metadata as histogram_metadata
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import api_pb2

from tapeline.config import HPARAM, Parameter, RunConfig, parameters_with
from tapeline.gradients.noise import DECAY, NOISE_SCALE_METRIC, NoiseSmoother
from tapeline.gradients.schema import STEP_COLUMNS
from tapeline.reader import read_steps
from tapeline.storage.root import Storage

HISTOGRAM_BUCKETS = 30  # as tf.summary.histogram's default
STEP_EVERY = 10  # step scalars are written every this many steps
EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


class _Number(hp.Domain):
    """A numeric parameter whose range is not known in advance: typed, so the dashboard offers a min/max filter."""

    dtype = float
    min_value = max_value = None

    def sample_uniform(self, rng=None):
        raise NotImplementedError("a run's parameters are recorded, not sampled")

    def update_hparam_info(self, hparam_info) -> None:
        hparam_info.type = api_pb2.DATA_TYPE_FLOAT64


def _hparam(parameter: Parameter) -> hp.HParam:
    """A run parameter as TensorBoard's HParams dashboard shows it: its choices, true/false, a number, or any text."""
    if parameter.choices:
        domain = hp.Discrete(list(parameter.choices))
    elif parameter.kind is bool:
        domain = hp.Discrete([False, True])
    else:
        domain = None if parameter.kind is str else _Number()  # text (a model spec, an image size): no domain to list
    return hp.HParam(parameter.name, domain, description=parameter.help)


# The run parameters marked HPARAM (tapeline/config.py). TensorBoard lists them by name and shows the first five
# until a user ticks more.
HPARAMS = tuple(_hparam(parameter) for parameter in parameters_with(HPARAM))
# In the order of the table's columns; it shows the first five until a user ticks more.
METRICS = (
    hp.Metric("metrics/test_accuracy", display_name="test accuracy"),
    hp.Metric("epoch/val_accuracy", display_name="val accuracy", dataset_type=hp.Metric.VALIDATION),
    hp.Metric("epoch/val_loss", display_name="val loss", dataset_type=hp.Metric.VALIDATION),
    hp.Metric("epoch/train_accuracy", display_name="train accuracy", dataset_type=hp.Metric.TRAINING),
    hp.Metric("epoch/train_loss", display_name="train loss", dataset_type=hp.Metric.TRAINING),
    hp.Metric("metrics/test_loss", display_name="test loss"),
    hp.Metric(
        f"metrics/{NOISE_SCALE_METRIC}",
        display_name="noise scale (smoothed, median of last epoch)",
        description="the median over the last epoch of the smoothed gradient noise scale: run.json's " + NOISE_SCALE_METRIC,
    ),
)
SMOOTHED_NOISE = (
    f"The gradient noise scale, smoothed: EMA(tr Σ) / EMA(|G|²) over every step so far, decay {DECAY:g}. Its median over "
    f"the last epoch is run.json's {NOISE_SCALE_METRIC}; the raw value of each step is step/noise_scale_raw."
)


def run_hparams(config: RunConfig) -> dict[str, object]:
    """The run's values of HPARAMS; a parameter that is unset (None: no train limit) is left out, not faked."""
    values = {param.name: getattr(config, param.name) for param in HPARAMS}
    return {name: value for name, value in values.items() if value is not None}


class RunSummaries:
    """The run's TensorBoard writer and what it writes; a context manager (closes the writer).

    The loop calls `call` after every call of steps (each step's scalars, the examples'
    norms kept for the epoch's histogram), `snapshot` at every step kept in full (the
    gradient recorder hands it the host copies it made for the snapshot writer), and
    `epoch_end` after validation; `epoch_end` also publishes the event file (object
    stores: an upload), so what TensorBoard shows is at most an epoch old.
    """

    def __init__(self, storage: Storage, directory: Path, writes: bool):
        self.storage, self.directory = storage, directory
        with storage.writing(directory):  # TensorFlow writes the event file's first record at once
            self.writer = tf.summary.create_file_writer(str(directory)) if writes else None
        self._noise = NoiseSmoother()  # as noise.smoothed_noise_scale smooths a whole run
        self._example_norms: list[np.ndarray] = []  # this epoch's, a call at a time

    def start(self, config: RunConfig, run_id: str) -> None:
        """The HParams dashboard's experiment and this run's row (again on a resume: the same values)."""
        if self.writer is None:
            return
        with self._writing():
            hp.hparams_config(hparams=list(HPARAMS), metrics=list(METRICS))
            hp.hparams(run_hparams(config), trial_id=run_id, start_time_secs=int(time.time()))

    def catch_up(self, run: str, step: int) -> None:
        """On a resume from `step`: the noise EMAs take the steps logged up to it, so the smoothed curve goes on, not from 0.

        `run`: the run's directory. Steps logged after the checkpoint (before a crash) are not taken: they run again.
        """
        if self.writer is None or step == 0:
            return
        logged = read_steps(run, columns=["step", "grad_variance", "grad_signal"]).filter(pc.field("step") <= step).sort_by("step")
        for variance, signal in zip(*(logged[name].to_numpy(zero_copy_only=False) for name in ("grad_variance", "grad_signal"))):
            self._noise.update(variance, signal)

    def call(self, first_step: int, result) -> None:
        """After a call of steps (a calls.CallResult): each step's scalars; the per-example norms for the epoch's histogram."""
        if self.writer is None:
            return
        columns = {name: column.tolist() for name, column in result.values.items()}
        for i in range(result.steps):
            self.step(first_step + i, {name: column[i] for name, column in columns.items()})
        if result.examples is not None:  # ‖gᵢ‖ over all variables, as the samples dataset's grad_norm
            self._example_norms.append(np.sqrt(np.asarray(result.examples.squared_norms, np.float64).sum(axis=1)))

    def step(self, step: int, values: Mapping[str, float]) -> None:
        """After every step, its `steps/` columns by name: the EMAs take every step's noise estimates; every
        STEP_EVERY-th step, each value whose column has a tag (schema.STEP_COLUMNS) and the smoothed noise scale."""
        if self.writer is None:
            return
        smoothed = self._noise.update(_or_nan(values.get("grad_variance")), _or_nan(values.get("grad_signal")))
        if step % STEP_EVERY:
            return
        with self._writing(step):
            for name, value in values.items():
                column = STEP_COLUMNS.get(name)
                if column and column.tag and (_finite(value) or not column.finite_only):
                    tf.summary.scalar(column.tag, value, description=column.description)
            if _finite(smoothed):
                tf.summary.scalar("step/noise_scale_smoothed", smoothed, description=SMOOTHED_NOISE)

    def snapshot(self, step: int, variables: Sequence[str], gradients: Sequence[np.ndarray]) -> None:
        """At a step kept in full: a histogram of each variable's gradient values, from the snapshot's host copies."""
        if self.writer is None:
            return
        with self._writing(step):
            for variable, values in zip(variables, gradients):
                _histogram("gradients/" + variable, values)

    def epoch_end(self, step: int, row: Mapping, learning_rate: float, example_norms: np.ndarray | None = None) -> None:
        """The epoch's metrics (`row`: its line of the run's history) and per-example gradient norms (default: those
        of the calls since the last epoch end); then publish."""
        if self.writer is None:
            return
        if example_norms is None and self._example_norms:
            example_norms = np.concatenate(self._example_norms)
        self._example_norms = []
        with self._writing(step):
            for name in EPOCH_METRICS:
                if row[name] is not None:  # no validation split: no val_*
                    tf.summary.scalar("epoch/" + name, row[name])
            tf.summary.scalar("epoch/learning_rate", learning_rate)
            if example_norms is not None and len(example_norms):
                _histogram("epoch/example_grad_norms", example_norms)
        self.publish()

    def publish(self) -> None:
        """The event file as it is so far, on disk and (object stores) uploaded."""
        with self.storage.publishing(self.directory):
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            with self.storage.writing(self.directory):
                self.writer.close()

    @contextlib.contextmanager
    def _writing(self, step: int | None = None) -> Iterator[None]:
        """The run's writer as the default, at `step`; TensorFlow writes to disk every few summaries, so a full disk
        can show in any of them: `StorageFull` (tapeline/storage/root.py)."""
        with self.storage.writing(self.directory), self.writer.as_default(step=step):
            yield

    def __enter__(self) -> RunSummaries:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_run_metrics(storage: Storage, run_id: str, step: int, metrics: Mapping[str, float | None]) -> None:
    """Final metrics of a finished run (test accuracy, …) as `metrics/<name>` scalars at its last `step`, in an
    event file of their own beside the training's: the HParams dashboard shows those METRICS declares. A metric the
    run has none of (None: no noise scale without per-example norms) is left out, not faked."""
    directory = storage.layout.run(run_id).tensorboard
    descriptions = {metric.as_proto().name.tag: metric.as_proto().description for metric in METRICS}
    with storage.publishing(directory):
        writer = tf.summary.create_file_writer(str(directory))
        with writer.as_default(step=step):
            for name, value in metrics.items():
                if value is not None:
                    tf.summary.scalar("metrics/" + name, value, description=descriptions.get("metrics/" + name) or None)
        writer.close()


def _histogram(tag: str, values: np.ndarray) -> None:
    """`tf.summary.histogram`'s buckets (HISTOGRAM_BUCKETS equal ones from the least value to the greatest), counted
    by numpy: 30 times faster on the host arrays a snapshot has (docs/performance.md). Non-finite values, which a
    snapshot kept for them has, are left out: TensorBoard cannot draw a bucket edge at NaN."""
    values = values.ravel().astype(np.float32, copy=False)  # float16 gradients: numpy counts float32 5 times faster
    least, greatest = _bounds(values)
    if not (np.isfinite(least) and np.isfinite(greatest)):  # NaN shows in either, an Inf in one
        values = values[np.isfinite(values)]
        least, greatest = _bounds(values)
    if greatest > least:
        counts, edges = np.histogram(values, bins=HISTOGRAM_BUCKETS, range=(least, greatest))
    else:  # one value (or none): TensorBoard's own convention, every count in the last bucket
        counts, edges = np.zeros(HISTOGRAM_BUCKETS), np.full(HISTOGRAM_BUCKETS + 1, least)
        counts[-1] = values.size
    buckets = np.stack([edges[:-1], edges[1:], counts], axis=1).astype(np.float64)
    tf.summary.write(tag, buckets, metadata=histogram_metadata.create_summary_metadata(display_name=None, description=None))


def _bounds(values: np.ndarray) -> tuple[float, float]:
    return (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)
