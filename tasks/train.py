"""Stage 3, train: the example's custom GradientTape loop, compiled, with gradient snapshots.

The loop reads as the algorithm: for each batch, compute the loss under a tape,
take `tape.gradient`, apply it with Adam; every `snapshot_every` steps (and at the
first and last step) hand the very gradients that were applied to the snapshot
writer. Epoch order comes from (seed, epoch) alone, so a step's batch is known
on the host without asking TensorFlow.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from prefect import task

from tasks.config import RunConfig
from tasks.gradients import SnapshotWriter, write_steps
from tasks.model import build_model, resolve_device
from tasks.preprocess import IMAGE_SHAPE, PreparedData, read_split
from tasks.storage import Storage, atomic_path

EVAL_BATCH_SIZE = 1024


@dataclass(frozen=True)
class TrainedModel:
    """The train stage's result: where the model and the raw gradient files are, and how training went."""

    run_id: str
    device: str
    model_uri: str
    gradients_uri: str
    steps_uri: str
    variables: list[str]
    steps: int
    epochs: list[dict]


def train_model(config: RunConfig, data: PreparedData, run_id: str) -> TrainedModel:
    run_dir = Storage(config.storage).run_dir(run_id)
    device = resolve_device(config.device)
    print(f"training on {device} ({tf.config.list_physical_devices('GPU') or 'no GPU visible'})")
    keras.utils.set_random_seed(config.seed)
    images, labels, sample_ids = read_split(data.uris["train"], config.train_limit)
    val_images, val_labels, _ = read_split(data.uris["validation"])

    with tf.device(device):
        model = build_model()
        optimizer = keras.optimizers.Adam(config.learning_rate)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        train_loss, train_accuracy = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()
        val_loss, val_accuracy = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()
        batch_spec = (tf.TensorSpec([None, *IMAGE_SHAPE], tf.uint8), tf.TensorSpec([None], tf.uint8))

        @tf.function(input_signature=batch_spec)
        def train_step(x, y):
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = loss_fn(y, logits)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            train_loss.update_state(loss)
            train_accuracy.update_state(y, logits)
            return loss, gradients

        @tf.function(input_signature=batch_spec)
        def eval_step(x, y):
            logits = model(x, training=False)
            val_loss.update_state(loss_fn(y, logits), sample_weight=tf.shape(y)[0])
            val_accuracy.update_state(y, logits)

        variables = [v.path for v in model.trainable_variables]
        steps_per_epoch = math.ceil(len(images) / config.batch_size)
        last_step = config.epochs * steps_per_epoch
        images_t, labels_t = tf.constant(images), tf.constant(labels)
        history, step = [], 0
        with SnapshotWriter(run_dir / "gradients", run_id, variables) as snapshots:
            for epoch in range(1, config.epochs + 1):
                order = epoch_order(len(images), config.seed, epoch)
                step_numbers, losses, batch_ids = [], [], []
                for metric in (train_loss, train_accuracy, val_loss, val_accuracy):
                    metric.reset_state()
                started, timed_from, timed_samples = time.perf_counter(), None, 0
                for i, (x, y) in enumerate(batches(images_t, labels_t, order, config.batch_size)):
                    loss, gradients = train_step(x, y)
                    step += 1
                    batch = order[i * config.batch_size : (i + 1) * config.batch_size]
                    step_numbers.append(step)
                    losses.append(float(loss))
                    batch_ids.append(sample_ids[batch])
                    if step == 1 or step % config.snapshot_every == 0 or step == last_step:
                        snapshots.write(step, epoch, [g.numpy() for g in gradients])
                    if timed_from is None:  # leave the first step (tracing, compiling) out of the speed
                        timed_from = time.perf_counter()
                    else:
                        timed_samples += len(batch)
                seconds = time.perf_counter() - started
                train_seconds = time.perf_counter() - timed_from
                write_steps(run_dir / "steps", epoch, step_numbers, losses, batch_ids)
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
                print(_epoch_line(history[-1], config.epochs))

    model_path = run_dir / "model.keras"
    with atomic_path(model_path) as temporary:
        model.save(temporary)
    return TrainedModel(
        run_id=run_id,
        device=device,
        model_uri=str(model_path),
        gradients_uri=str(run_dir / "gradients"),
        steps_uri=str(run_dir / "steps"),
        variables=variables,
        steps=step,
        epochs=history,
    )


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order in which an epoch visits the training split: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(images: tf.Tensor, labels: tf.Tensor, order: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """Batches of (uint8 images, labels) in `order`: index batches gathered in one op, prefetched."""
    return (
        tf.data.Dataset.from_tensor_slices(order)
        .batch(batch_size)
        .map(lambda idx: (tf.gather(images, idx), tf.gather(labels, idx)), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )


def _epoch_line(row: dict, epochs: int) -> str:
    val = f"val loss {row['val_loss']:.4f} accuracy {row['val_accuracy']:.4f}" if row["val_loss"] is not None else "no validation"
    speed = row["train_samples_per_second"]
    return (
        f"epoch {row['epoch']}/{epochs}: train loss {row['train_loss']:.4f} accuracy {row['train_accuracy']:.4f}, "
        f"{val}, {row['seconds']:.1f} s" + (f", {speed:,.0f} samples/s" if speed else "")
    )


@task(name="train", tags=["gpu"])
def train(config: RunConfig, data: PreparedData, run_id: str) -> TrainedModel:
    """Train the CNN with a compiled GradientTape step; save the model and gradient snapshots under the run."""
    return train_model(config, data, run_id)
