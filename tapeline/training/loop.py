"""Stage 3, train: the example's custom GradientTape loop, compiled, checkpointed, with gradient snapshots.

The loop reads as the algorithm: for each batch, compute the loss under a tape,
take `tape.gradient`, apply it with Adam; every `snapshot_every` steps (and at the
first and last step) hand the very gradients that were applied to the snapshot
writer. Epoch order comes from (seed, epoch) alone, so a step's batch is known on
the host without asking TensorFlow, and a resumed run continues at the exact
batch where the checkpoint was taken.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tapeline.config import RunConfig
from tapeline.data.splits import IMAGE_SHAPE, read_split
from tapeline.errors import NonFiniteError
from tapeline.gradients.writers import SnapshotPolicy, SnapshotWriter, StepLog
from tapeline.model import build_model
from tapeline.results import PreparedData, TrainedModel
from tapeline.storage.root import Storage
from tapeline.training.checkpoints import TrainingCheckpoint
from tapeline.training.cluster import check_cluster, job_for, join_cluster
from tapeline.training.devices import resolve_devices

EVAL_BATCH_SIZE = 1024
BATCH_SPEC = (tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8), tf.TensorSpec([None], tf.uint8))
# A checkpoint from another run must not be resumed under these changed.
RESUME_PARAMETERS = (
    "dataset", "batch_size", "learning_rate", "seed", "train_limit", "validation_size", "precision", "deterministic",
)


def make_train_step(model, optimizer, loss_fn, loss_metric, accuracy_metric, jit_compile: bool = True) -> Callable:
    """The compiled step: (uint8 images, labels) -> (loss, gradients as tape.gradient returned them).

    With XLA the step is one fused program; on CPU most of the gain is Adam, whose
    ten element-wise passes over the 11 MB dense kernel become one. With a
    LossScaleOptimizer (mixed_float16) the tape differentiates the scaled loss;
    the returned gradients are divided back, so they are always the true ones.
    """

    @tf.function(input_signature=BATCH_SPEC, jit_compile=jit_compile)
    def train_step(x, y):
        scale = _loss_scale(optimizer)
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = loss_fn(y, logits)
            scaled_loss = loss if scale is None else loss * scale
        scaled_gradients = tape.gradient(scaled_loss, model.trainable_variables)
        optimizer.apply_gradients(zip(scaled_gradients, model.trainable_variables))
        gradients = _unscaled(scaled_gradients, scale)
        loss_metric.update_state(loss)
        accuracy_metric.update_state(y, logits)
        return loss, gradients

    return train_step


def make_distributed_train_step(strategy, model, optimizer, loss_metric, accuracy_metric) -> Callable:
    """The same step on `strategy`'s replicas, each on its slice of the batch.

    Each replica's loss is its share of the whole batch's mean loss, so the sum of
    the replicas' gradients, which the optimizer all-reduces and applies, is the
    gradient of the whole batch. That sum is what this step returns and the run
    exports. A last batch smaller than the replica count leaves some replicas an
    empty slice; theirs is a zero share, so every sample of the epoch is trained on,
    as on one device. (No XLA here: it does not compile the cross-replica all-reduce.)
    """
    per_sample_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    logits_spec = model.compute_output_spec(keras.KerasTensor([None, *IMAGE_SHAPE], "uint8"))  # symbolic: runs nothing

    def slice_step(x, y, batch_size, scale):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            loss = tf.reduce_sum(per_sample_loss(y, logits)) / tf.cast(batch_size, logits.dtype)
            scaled_loss = loss if scale is None else loss * scale
        return loss, tape.gradient(scaled_loss, model.trainable_variables), logits

    def empty_slice():
        """A replica's share of a last batch smaller than the replica count: no samples, zero loss and gradients.

        The model must not run on an empty batch: TensorFlow's Conv2D returns its
        input's shape for one (TF 2.21), and the gradient then fails on the mismatch.
        """
        gradients = [tf.zeros(v.shape, v.dtype) for v in model.trainable_variables]
        return tf.zeros([], logits_spec.dtype), gradients, tf.zeros([0, *logits_spec.shape[1:]], logits_spec.dtype)

    def replica_step(x, y, scale=None):
        batch_size = tf.distribute.get_replica_context().all_reduce("sum", tf.shape(y)[0])
        loss, scaled_gradients, logits = tf.cond(tf.size(y) > 0, lambda: slice_step(x, y, batch_size, scale), empty_slice)
        optimizer.apply_gradients(zip(scaled_gradients, model.trainable_variables))
        return loss, scaled_gradients, logits, tf.cast(y, tf.int32)  # gather takes no uint8

    @tf.function
    def train_step(x, y):
        scale = _loss_scale(optimizer)
        losses, scaled_gradients, logits, y = strategy.run(replica_step, args=(x, y) if scale is None else (x, y, scale))
        loss = strategy.reduce("sum", losses, axis=None)
        gradients = _unscaled([strategy.reduce("sum", g, axis=None) for g in scaled_gradients], scale)
        loss_metric.update_state(loss)
        accuracy_metric.update_state(strategy.gather(y, axis=0), strategy.gather(logits, axis=0))
        return loss, gradients

    return train_step


def _loss_scale(optimizer) -> tf.Tensor | None:
    """The current loss scale under mixed_float16 (the optimizer unscales what it applies); None otherwise.

    None, not 1.0: without loss scaling the step carries no multiply and no divide.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        return tf.convert_to_tensor(optimizer.dynamic_scale)
    return None


def _unscaled(gradients: list, scale: tf.Tensor | None) -> list:
    return gradients if scale is None else [g / scale for g in gradients]


@tf.function  # a TensorFlow graph, not XLA: XLA's CPU reductions ran single-threaded and 4-5x slower here
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


def with_stats(train_step: Callable) -> Callable:
    """The step, then `gradient_stats` of its gradients, in one call: (loss, gradients, stats).

    One call from Python per step instead of two (a call costs about 0.5 ms here, 2% of
    a step); the step inside stays as compiled (XLA), the statistics a TensorFlow graph.
    """

    @tf.function
    def step_with_stats(x, y):
        loss, gradients = train_step(x, y)
        return loss, gradients, gradient_stats(gradients)

    return step_with_stats


def host_arrays(tensors, dtype: str) -> list[np.ndarray]:
    """Host copies in the stored dtype, cast on the device (20x faster than numpy's float16 cast)."""
    return [tf.cast(t, dtype).numpy() for t in tensors]


def make_eval_step(model, loss_metric, accuracy_metric) -> Callable:
    # Per-sample losses: under a distribution strategy Keras divides a reduced loss by the number of replicas.
    per_sample_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    @tf.function(input_signature=BATCH_SPEC)
    def eval_step(x, y):
        logits = model(x, training=False)
        loss_metric.update_state(per_sample_loss(y, logits))
        accuracy_metric.update_state(y, logits)

    return eval_step


def train_model(
    config: RunConfig,
    data: PreparedData,
    run_id: str,
    warm_start: dict | None = None,
    on_progress: Callable[[int, int, float], None] | None = None,
) -> TrainedModel:
    """Train, resuming from the run's latest checkpoint if it has one; `on_progress(step, last_step, loss)` each step.

    `warm_start`, a champion's pointer (see tasks/champion.py), starts from its model's weights instead of random ones.
    """
    storage = Storage(config.storage)
    run = storage.layout.run(run_id)
    devices = resolve_devices(config.device, config.devices)
    cluster = check_cluster(devices, run_id)  # TF_CONFIG naming two or more workers: MultiWorkerMirroredStrategy
    if cluster:
        strategy = join_cluster(cluster, storage, job_for(config, data, run_id, warm_start), devices)
    else:
        strategy = tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else None
    writes = cluster is None or cluster.chief  # the others run every step and collective, and write nothing
    print(f"training on {', '.join(devices)} ({tf.config.list_physical_devices('GPU') or 'no GPU visible'})")
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(config.seed)
    images, labels, sample_ids = read_split(data.uris["train"], config.train_limit)
    val_images, val_labels, _ = read_split(data.uris["validation"])

    with strategy.scope() if strategy else tf.device(devices[0]):
        model = build_model(config.precision)
        optimizer = keras.optimizers.Adam(config.learning_rate)
        if config.precision == "mixed_float16":  # float16's range needs the loss scaled up, the gradients back down
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(model.trainable_variables)  # create the slots now, so a checkpoint can fill them
        if warm_start:  # the optimizer starts fresh: its moments belong to the champion's data order
            model.load_weights(storage.local(warm_start["model"]))
            print(f"warm start from the champion, run {warm_start['run_id']} (test accuracy {warm_start['test_accuracy']:.4f})")
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        train_loss, train_accuracy = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()
        val_loss, val_accuracy = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()
        if strategy:
            train_step = make_distributed_train_step(strategy, model, optimizer, train_loss, train_accuracy)
        else:
            train_step = make_train_step(model, optimizer, loss_fn, train_loss, train_accuracy, config.jit_compile)
        train_step = with_stats(train_step)
        eval_step = make_eval_step(model, val_loss, val_accuracy)
        parameters = {name: getattr(config, name) for name in RESUME_PARAMETERS} | {"data": Path(data.directory).name}
        checkpoint = TrainingCheckpoint(
            storage, run.checkpoints, model, optimizer, [train_loss, train_accuracy], parameters, writes=writes
        )
        step, history = checkpoint.restore()
        resumed_from = step

        variables = [v.path for v in model.trainable_variables]
        steps_per_epoch = math.ceil(len(images) / config.batch_size)
        last_step = config.epochs * steps_per_epoch
        images_t, labels_t = tf.constant(images), tf.constant(labels)
        summaries = tf.summary.create_file_writer(str(run.tensorboard)) if writes else tf.summary.create_noop_writer()
        trained = TrainedModel(
            run_id=run_id, device=",".join(devices) + (f" on each of {cluster.workers} workers" if cluster else ""),
            model_uri=None, gradients_uri=storage.uri_of(run.gradients), steps_uri=storage.uri_of(run.steps),
            tensorboard_uri=storage.uri_of(run.tensorboard), variables=variables,
            steps=step, resumed_from=resumed_from, warm_start=warm_start, epochs=history,
            role="single" if cluster is None else "chief" if cluster.chief else f"{cluster.task_type} {cluster.task_id}",
        )  # fmt: skip

        loss_scaled = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
        learning_rate = float(optimizer.learning_rate.numpy())
        policy = SnapshotPolicy(config.snapshot_every, last_step, config.spike_factor)
        log = StepLog(storage, run, variables) if writes else _Discard()
        snapshots = SnapshotWriter(storage, run.gradients, run_id, variables, config.gradient_dtype) if writes else _Discard()
        with snapshots, summaries.as_default():
            for epoch in range(step // steps_per_epoch + 1, config.epochs + 1):
                first_batch = step - (epoch - 1) * steps_per_epoch  # > 0 only in an epoch resumed mid-way
                if first_batch == 0:  # a resumed epoch keeps the running metrics it restored
                    train_loss.reset_state()
                    train_accuracy.reset_state()
                order = epoch_order(len(images), config.seed, epoch)
                started, timed_from, timed_samples = time.perf_counter(), None, 0
                epoch_batches = batches(images_t, labels_t, order, config.batch_size, first_batch)
                if strategy:  # each replica, on any worker, takes its slice of every global batch
                    epoch_batches = strategy.experimental_distribute_dataset(epoch_batches.with_options(SHARD_BY_DATA))
                for i, (x, y) in enumerate(epoch_batches, first_batch):
                    weights = None
                    if config.snapshot_weights and policy.scheduled(step + 1):  # the values the gradient is taken at
                        weights = host_arrays(model.trainable_variables, config.gradient_dtype)
                    loss, gradients, stats = train_step(x, y)
                    step += 1
                    batch = sample_ids[order[i * config.batch_size : (i + 1) * config.batch_size]]
                    loss, stats = float(loss), stats.numpy()
                    # Under loss scaling an overflowing gradient is expected now and then: the
                    # optimizer skips that step and lowers the scale. Only the loss decides there.
                    finite = math.isfinite(loss) and (loss_scaled or not stats[:, 5:].any())
                    global_norm = float(np.sqrt(np.sum(np.square(stats[:, 0], dtype=np.float64))))
                    log.append(step, epoch, loss, global_norm, learning_rate, batch, stats)
                    reason = policy.reason(step, global_norm, finite)
                    if reason:
                        snapshots.write(step, epoch, reason, host_arrays(gradients, config.gradient_dtype), stats[:, 0], weights)
                    if not finite:
                        log.flush()
                        raise _non_finite(step, epoch, loss, variables, stats, checkpoint, trained)
                    if step % 10 == 0:
                        tf.summary.scalar("step/loss", loss, step=step)
                    if step % config.checkpoint_every == 0 and step % steps_per_epoch:
                        log.flush()  # before the checkpoint: a resume rewrites these rows, never misses them
                        checkpoint.save(step, history)
                    if on_progress:
                        on_progress(step, last_step, loss)
                    if timed_from is None:  # leave the first step (tracing, compiling) out of the speed
                        timed_from = time.perf_counter()
                    else:
                        timed_samples += len(batch)
                log.flush()
                seconds, train_seconds = time.perf_counter() - started, time.perf_counter() - timed_from
                for metric in (val_loss, val_accuracy):
                    metric.reset_state()
                for start in range(0, len(val_images), EVAL_BATCH_SIZE):
                    eval_step(val_images[start : start + EVAL_BATCH_SIZE], val_labels[start : start + EVAL_BATCH_SIZE])
                history.append(
                    {
                        "epoch": epoch,
                        "train_loss": float(train_loss.result()),
                        "train_accuracy": float(train_accuracy.result()),
                        "val_loss": float(val_loss.result()) if len(val_images) else None,
                        "val_accuracy": float(val_accuracy.result()) if len(val_images) else None,
                        "seconds": round(seconds, 3),
                        "train_samples_per_second": round(timed_samples / train_seconds, 1) if timed_samples else None,
                    }
                )
                _epoch_summaries(history[-1], step, config.learning_rate)
                if writes:  # TensorBoard's event file as it is so far (an upload, for an object store)
                    with storage.publishing(run.tensorboard):
                        summaries.flush()
                checkpoint.save(step, history)
                print(_epoch_line(history[-1], config.epochs))

    if writes:
        with storage.atomic(run.model, suffix=".keras") as temporary:  # Keras saves only to a .keras name
            model.save(temporary)
    return dataclasses.replace(trained, model_uri=storage.uri_of(run.model), steps=step, epochs=history)


# Shard by element, not by file: each worker takes its replicas' slices of every global batch
# (tf.distribute rebatches it into one slice per replica), so a step's global batch is a single worker's.
SHARD_BY_DATA = tf.data.Options()
SHARD_BY_DATA.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA


class _Discard:
    """Stands in for the snapshot writer and the step log on a worker that writes nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


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


def _non_finite(step, epoch, loss, variables, stats, checkpoint, trained) -> NonFiniteError:
    bad = ["loss"] if not math.isfinite(loss) else []
    bad += [name for name, row in zip(variables, stats) if row[5:].any()]
    latest = checkpoint.latest_step
    kept = "no checkpoint was written yet" if latest is None else f"the last good checkpoint is step {latest}"
    return NonFiniteError(
        f"non-finite values at step {step} (epoch {epoch}) in {', '.join(bad)}; {kept}, the gradients of step {step} were exported",
        dataclasses.replace(trained, steps=step),
    )


def _epoch_summaries(row: dict, step: int, learning_rate: float) -> None:
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        if row[name] is not None:
            tf.summary.scalar("epoch/" + name, row[name], step=step)
    tf.summary.scalar("epoch/learning_rate", learning_rate, step=step)


def _epoch_line(row: dict, epochs: int) -> str:
    val = f"val loss {row['val_loss']:.4f} accuracy {row['val_accuracy']:.4f}" if row["val_loss"] is not None else "no validation"
    speed = row["train_samples_per_second"]
    return (
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} accuracy {row['train_accuracy']:.4f}, "
        f"{val}, {row['seconds']:.1f} s" + (f", {speed:,.0f} samples/s" if speed else "")
    )
