"""Stage 3, train: the example's custom GradientTape loop, compiled, checkpointed, with gradient snapshots.

The loop reads as the algorithm: run the compiled step (the loss under a tape,
`tape.gradient`, Adam applies it; see steps.py) on each batch, and tell the
gradient recorder what each step produced; it keeps every step's statistics and,
every `snapshot_every` steps (and at the first and last step, and on anomalies),
the very gradients that were applied (see tapeline/gradients/recorder.py). Python
runs it a call of up to `steps_per_call` steps at a time (calls.py), each call
ending where the host must act. Epoch order comes from (seed, epoch) alone
(batches.py), so a step's batch is known on the host without asking TensorFlow,
and a resumed run continues at the exact batch where the checkpoint was taken.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from tapeline.config import RESUME, RunConfig, parameters_with
from tapeline.curation.exclusion import without_excluded
from tapeline.data.shape import DataShape
from tapeline.data.splits import read_split, single_label_warning
from tapeline.errors import NonFiniteError
from tapeline.gradients.per_example import PerExamplePlan, per_example_plan
from tapeline.gradients.recorder import GradientRecorder, NullRecorder, SnapshotPolicy
from tapeline.gradients.writers import SnapshotWriter, StepLog
from tapeline.model import ModelSpec, architecture_digest, model_record
from tapeline.results import PreparedData, TrainedModel
from tapeline.storage.layout import RunPaths
from tapeline.storage.root import Storage
from tapeline.training.batches import batch_sample_ids, epoch_order
from tapeline.training.calls import AnomalyWatch, StepCalls, call_length
from tapeline.training.checkpoints import TrainingCheckpoint
from tapeline.training.cluster import Cluster, check_cluster, job_for, join_cluster
from tapeline.training.devices import resolve_devices
from tapeline.training.steps import host_arrays, make_distributed_train_step, make_eval_step, make_train_step
from tapeline.training.summaries import RunSummaries

EVAL_BATCH_SIZE = 1024


class Training(NamedTuple):
    """What `build_training` makes: the model and what trains it."""

    model: keras.Model
    optimizer: keras.optimizers.Optimizer
    train_step: Callable  # (images, labels) -> (loss, gradients, per-example results or None), see steps.py
    eval_step: Callable  # (images, labels) -> None, updates val_metrics
    train_metrics: list[keras.metrics.Metric]  # running loss and accuracy of the epoch
    val_metrics: list[keras.metrics.Metric]
    per_example: dict  # run.json's `model.per_example`: whether the step computes each example's norms, and how


def train_model(
    config: RunConfig,
    data: PreparedData,
    run_id: str,
    warm_start: dict | None = None,
    on_progress: Callable[[int, int, float], None] | None = None,
    curation: dict | None = None,
) -> TrainedModel:
    """Train, resuming from the run's latest checkpoint if it has one; `on_progress(step, last_step, loss)` each step.

    `warm_start`, run.json's record of it (tapeline/registry/warm_start.py), names the model whose weights training starts
    from instead of random ones (`from`, `model`; none when `from` is None). `curation`, run.json's record of
    `exclude` (tapeline/curation/exclusion.py), names the training examples left out.
    """
    storage = Storage(config.storage)
    run = storage.layout.run(run_id)
    # Place: the devices, and, when TF_CONFIG names a cluster, this worker's place in it.
    devices, cluster, strategy = _place(config, data, run_id, warm_start, storage, curation)
    writes = cluster is None or cluster.chief  # the other workers run every step and collective, and write nothing
    _op_determinism(config.deterministic)
    keras.utils.set_random_seed(config.seed)
    images, labels, sample_ids = without_excluded(curation, *read_split(data.uris["train"], config.train_limit))
    if (warning := single_label_warning(labels)) and writes:
        print(warning)
    val_images, val_labels, _ = read_split(data.uris["validation"])

    with strategy.scope() if strategy else tf.device(devices[0]):
        # Build, then restore: another run's weights for a warm start, this run's checkpoint for a resume.
        model, optimizer, train_step, eval_step, train_metrics, val_metrics, per_example = build_training(config, data.shape, strategy)
        if warm_start and warm_start["from"]:
            _load_warm_start(model, storage, warm_start)
        resume_parameters = _resume_parameters(config, data, model, curation)
        shadow = model_and_optimizer(config, data.shape) if strategy is None else None  # checkpoints written in the background from it
        checkpoint = TrainingCheckpoint(storage, run.checkpoints, model, optimizer, train_metrics, resume_parameters, writes, shadow)
        step, history = checkpoint.restore()
        steps_per_epoch = math.ceil(len(images) / config.batch_size)
        last_step = config.epochs * steps_per_epoch
        recorded = model_record(config.model, model) | {"per_example": per_example}
        trained = _trained_model(storage, run, devices, cluster, recorded, warm_start, step, history)
        variables = trained.variables
        summaries = RunSummaries(storage, run.tensorboard, writes)  # TensorBoard: tags and HParams in summaries.py
        summaries.start(config, run_id)
        summaries.catch_up(storage.uri_of(run.directory), step)  # a resume: the smoothed noise scale goes on where it stopped
        schedule = SnapshotPolicy(config.snapshot_every, last_step, config.spike_factor)  # the run's one: calls end at its steps
        recorder = open_recorder(config, storage, run, variables, optimizer, schedule, writes, summaries.snapshot)
        calls = step_calls(config, train_step, model, optimizer, tf.constant(images), tf.constant(labels), cluster is not None, per_example["norms"])
        steps = StepLoop(config, calls, recorder, schedule, checkpoint, model, trained, sample_ids, steps_per_epoch, on_progress, summaries)

        with recorder, checkpoint, summaries:  # leaving: snapshots and the checkpoint in flight written
            for epoch in range(step // steps_per_epoch + 1, config.epochs + 1):
                first_batch = step - (epoch - 1) * steps_per_epoch  # > 0 only in an epoch resumed mid-way
                if first_batch == 0:  # a resumed epoch keeps the running metrics it restored
                    _reset(train_metrics)
                order = epoch_order(len(images), config.seed, epoch)
                clock = EpochClock()
                step = steps.epoch(epoch, step, order, clock, history)

                # Epoch end: the log, validation, the epoch's metrics (history, TensorBoard), a checkpoint.
                logged = recorder.flush()
                timing = clock.stop()  # before validation: the epoch's training time
                history.append(_epoch_row(epoch, timing, train_metrics, _validate(eval_step, val_metrics, val_images, val_labels)))
                summaries.epoch_end(step, history[-1], config.learning_rate)  # and publishes the event file
                checkpoint.save(step, history, after=logged)
                print(_epoch_line(history[-1], config.epochs))

    # Save: the trained model, by the process that writes.
    if writes:
        with storage.atomic(run.model, suffix=".keras") as temporary:  # Keras saves only to a .keras name
            model.save(temporary)
    return dataclasses.replace(trained, model_uri=storage.uri_of(run.model), steps=step, epochs=history)


def _op_determinism(deterministic: bool) -> None:
    """Deterministic ops for this run, or not: the setting is the process's, so a run that does not ask for it must
    not inherit it from an earlier one in the process (XLA has no deterministic max-pooling gradient, for one)."""
    from tensorflow.python.framework import config as tf_config  # the public API can enable it, not disable it

    if deterministic:
        tf_config.enable_op_determinism()
    else:
        tf_config.disable_op_determinism()


def _place(
    config: RunConfig, data: PreparedData, run_id: str, warm_start: dict | None, storage: Storage, curation: dict | None = None
) -> tuple[list[str], Cluster | None, tf.distribute.Strategy | None]:
    """(devices, cluster, strategy): MirroredStrategy over several local devices; when TF_CONFIG names
    two or more workers, the cluster joined and its MultiWorkerMirroredStrategy; no strategy on one device."""
    devices = resolve_devices(config.device, config.devices)
    cluster = check_cluster(devices, run_id)
    if cluster:
        strategy = join_cluster(cluster, storage, job_for(config, data, run_id, warm_start, curation), devices)
    else:
        strategy = tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else None
    print(f"training on {', '.join(devices)} ({tf.config.list_physical_devices('GPU') or 'no GPU visible'})")
    return devices, cluster, strategy


def build_training(config: RunConfig, shape: DataShape, strategy: tf.distribute.Strategy | None = None) -> Training:
    """The model for data of `shape`, its optimizer, the compiled steps and their metrics; call in the device's or
    the strategy's scope."""
    model, optimizer = model_and_optimizer(config, shape)
    per_example = per_example_norms(config, model)
    train_metrics = [keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()]
    val_metrics = [keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()]
    if strategy:
        train_step = make_distributed_train_step(strategy, model, optimizer, *train_metrics, config.batch_size, per_example["norms"])
    else:
        train_step = make_train_step(model, optimizer, *train_metrics, config.jit_compile, per_example["norms"])
    return Training(model, optimizer, train_step, make_eval_step(model, *val_metrics), train_metrics, val_metrics, per_example)


def per_example_norms(config: RunConfig, model: keras.Model) -> dict:
    """Whether the step computes each example's gradient norms (asked for, and defined for the model), the layers that
    take the general fallback, and why not when not; the run says so in one line."""
    if not config.per_example_norms:
        return {"norms": False, "fallback": [], "reason": "not asked for (--no-per-example-norms)"}
    plan, reason = coupling(model)
    if reason:
        print(f"per-example gradient norms off: {reason}")
    elif note := plan.note():
        print(note)
    return {"norms": reason is None, "fallback": [] if reason else list(plan.fallback), "reason": reason}


def coupling(model: keras.Model) -> tuple[PerExamplePlan | None, str | None]:
    """(the model's per-example plan, None) when each example's own gradient is defined for it; else (the plan or None,
    why not: a layer that couples the examples of a batch, or a variable no layer holds)."""
    try:
        plan = per_example_plan(model)
    except ValueError as error:
        return None, str(error)
    return plan, plan.unsupported


def model_and_optimizer(config: RunConfig, shape: DataShape) -> tuple[keras.Model, keras.optimizers.Optimizer]:
    """The run's model for data of `shape` and its optimizer, its slots created (so a checkpoint can fill them)."""
    model = ModelSpec(config.model).build(shape, config.precision, config.seed)
    optimizer = keras.optimizers.Adam(config.learning_rate)
    if config.precision == "mixed_float16":  # float16's range needs the loss scaled up, the gradients back down
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    return model, optimizer


def _resume_parameters(config: RunConfig, data: PreparedData, model: keras.Model, curation: dict | None = None) -> dict:
    """What a checkpoint must have been trained with to be resumed: the parameters marked RESUME, the prepared data,
    the model's architecture (a spec's file may have changed since), and the examples left out (their digest) when
    there are any."""
    recorded = {p.name: getattr(config, p.name) for p in parameters_with(RESUME)}
    excluded = {"excluded": curation["digest"]} if curation and curation.get("count") else {}
    return recorded | {"data": Path(data.directory).name, "architecture": architecture_digest(model)} | excluded


def _trained_model(
    storage: Storage, run: RunPaths, devices: list[str], cluster: Cluster | None,
    model: dict, warm_start: dict | None, resumed_from: int, history: list[dict],
) -> TrainedModel:  # fmt: skip
    """What the run reports before its first step: where it writes, on what it trains, where it starts from."""
    return TrainedModel(
        run_id=run.run_id, device=",".join(devices) + (f" on each of {cluster.workers} workers" if cluster else ""),
        model_uri=None, gradients_uri=storage.uri_of(run.gradients), steps_uri=storage.uri_of(run.steps),
        tensorboard_uri=storage.uri_of(run.tensorboard), variables=[v["name"] for v in model["variables"]], model=model,
        steps=resumed_from, resumed_from=resumed_from, warm_start=warm_start, epochs=history,
        role="single" if cluster is None else "chief" if cluster.chief else f"{cluster.task_type} {cluster.task_id}",
    )  # fmt: skip


def _load_warm_start(model: keras.Model, storage: Storage, warm_start: dict) -> None:
    """The other run's weights; the optimizer starts fresh: its moments belong to that run's data order."""
    model.load_weights(storage.local(warm_start["model"]))
    print(f"warm start from run {warm_start['from']} ({warm_start['reason']})")


def open_recorder(
    config: RunConfig,
    storage: Storage,
    run: RunPaths,
    variables: list[str],
    optimizer,
    policy: SnapshotPolicy,
    writes: bool,
    on_snapshot: Callable | None = None,
) -> GradientRecorder | NullRecorder:
    """The run's gradient recorder, keeping the steps `policy` names; on a worker that does not write, one that keeps nothing."""
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if not writes:
        return NullRecorder(variables, loss_scaled)
    return GradientRecorder(
        variables,
        StepLog(storage, run, variables),
        SnapshotWriter(storage, run.gradients, run.run_id, variables, config.gradient_dtype),
        policy,
        learning_rate=float(optimizer.learning_rate.numpy()),
        loss_scaled=loss_scaled,
        snapshot_weights=config.snapshot_weights,
        to_host=functools.partial(host_arrays, dtype=config.gradient_dtype),  # cast on the device, copy once
        on_snapshot=on_snapshot,
    )


def _reset(metrics: list[keras.metrics.Metric]) -> None:
    for metric in metrics:
        metric.reset_state()


def _validate(eval_step: Callable, metrics: list[keras.metrics.Metric], images: np.ndarray, labels: np.ndarray) -> list[float | None]:
    """[loss, accuracy] on the validation split; [None, None] when it is empty."""
    _reset(metrics)
    for start in range(0, len(images), EVAL_BATCH_SIZE):
        eval_step(images[start : start + EVAL_BATCH_SIZE], labels[start : start + EVAL_BATCH_SIZE])
    return [float(metric.result()) if len(images) else None for metric in metrics]


def step_calls(
    config: RunConfig, train_step: Callable, model, optimizer, images: tf.Tensor, labels: tf.Tensor, multi_worker: bool, per_example: bool
) -> StepCalls:
    """Calls of up to `steps_per_call` steps, on one device or a distribution strategy's replicas.

    Multi-worker training runs one step per call: on TensorFlow 2.21 the workers' collectives
    in a graph loop of several steps are matched to the wrong instances (docs/multi-worker.md).
    """
    loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    watch = AnomalyWatch(config.spike_factor, loss_scaled)
    k = 1 if multi_worker else config.steps_per_call
    return StepCalls(train_step, model.trainable_variables, images, labels, config.batch_size, watch, k, per_example)


class StepLoop:
    """An epoch's training steps, a call at a time, the recorder told of each step, checkpoints where they fall."""

    def __init__(self, config, calls, recorder, schedule, checkpoint, model, trained, sample_ids, steps_per_epoch, on_progress, summaries=None):
        self.config, self.calls, self.recorder, self.schedule, self.checkpoint = config, calls, recorder, schedule, checkpoint
        self.model, self.trained, self.sample_ids, self.steps_per_epoch, self.on_progress = model, trained, sample_ids, steps_per_epoch, on_progress
        self.last_step, self.summaries = config.epochs * steps_per_epoch, summaries

    def epoch(self, epoch: int, step: int, order: np.ndarray, clock: EpochClock, history: list[dict]) -> int:
        """Run `epoch` from after `step` to its end; returns its last step. Raises NonFiniteError at a non-finite step."""
        config, end = self.config, epoch * self.steps_per_epoch
        self.calls.start_epoch(order, step - (epoch - 1) * self.steps_per_epoch)
        while step < end:
            count = call_length(step, self.calls.k, end, config.checkpoint_every, self.schedule, config.snapshot_weights)
            self.recorder.before_step(step + 1, self.model.trainable_variables)
            batch = step - (epoch - 1) * self.steps_per_epoch
            result = self.calls(batch, count)
            ids = [batch_sample_ids(self.sample_ids, order, batch + i, config.batch_size) for i in range(result.steps)]
            last, non_finite = self.recorder.record_call(step + 1, epoch, result, ids)
            if non_finite:
                raise _non_finite(last, epoch, non_finite, self.checkpoint, self.trained)
            if self.summaries:
                self.summaries.call(step + 1, result)  # TensorBoard
            for done, loss in zip(range(step + 1, last + 1), result.values["loss"].tolist()):
                self._step_done(done, loss)
            clock.call_done(sum(len(batch_ids) for batch_ids in ids))
            step = last
            if step % config.checkpoint_every == 0 and step % self.steps_per_epoch:  # an epoch's end has its own
                logged = self.recorder.flush()  # before the checkpoint: a resume rewrites these rows, never misses them
                self.checkpoint.save(step, history, after=logged)
        return step

    def _step_done(self, step: int, loss: float) -> None:
        if self.on_progress:
            self.on_progress(step, self.last_step, loss)


class EpochClock:
    """An epoch's wall time, and its training speed without its first call (tracing, compiling)."""

    def __init__(self):
        self.started, self._timed_from, self._samples = time.perf_counter(), None, 0

    def call_done(self, samples: int) -> None:
        """After each call: the first one starts the clock, and its samples, trained while compiling, do not count."""
        if self._timed_from is None:
            self._timed_from = time.perf_counter()
        else:
            self._samples += samples

    def stop(self) -> tuple[float, float | None]:
        """(seconds since the epoch started, samples per second after its first call; None with one call)."""
        now = time.perf_counter()
        return now - self.started, self._samples / (now - self._timed_from) if self._samples else None


def _epoch_row(epoch: int, timing: tuple[float, float | None], train_metrics: list, validation: list[float | None]) -> dict:
    """The epoch's line of the run's history (run.json, the checkpoint)."""
    (train_loss, train_accuracy), (val_loss, val_accuracy), (seconds, speed) = train_metrics, validation, timing
    return {
        "epoch": epoch,
        "train_loss": float(train_loss.result()),
        "train_accuracy": float(train_accuracy.result()),
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "seconds": round(seconds, 3),
        "train_samples_per_second": round(speed, 1) if speed else None,
    }


def _non_finite(step: int, epoch: int, values: list[str], checkpoint: TrainingCheckpoint, trained: TrainedModel) -> NonFiniteError:
    """The NaN guard's message: the step, what was not finite in it, where a rerun would resume."""
    checkpoint.wait()
    latest = checkpoint.latest_step
    kept = "no checkpoint was written yet" if latest is None else f"the last good checkpoint is step {latest}"
    return NonFiniteError(
        f"non-finite values at step {step} (epoch {epoch}) in {', '.join(values)}; {kept}, the gradients of step {step} were exported",
        dataclasses.replace(trained, steps=step),
    )


def _epoch_line(row: dict, epochs: int) -> str:
    val = f"val loss {row['val_loss']:.4f} accuracy {row['val_accuracy']:.4f}" if row["val_loss"] is not None else "no validation"
    speed = row["train_samples_per_second"]
    return f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} accuracy {row['train_accuracy']:.4f}, {val}, {row['seconds']:.1f} s" + (
        f", {speed:,.0f} samples/s" if speed else ""
    )
