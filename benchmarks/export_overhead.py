"""What gradient export costs: training samples/s with export on vs off, and bytes per snapshot.

In one process, on the same model, data and batch size, taking turns:

  export on   what `train_model` does each step: the compiled step and the per-step
              statistics in one call (`with_stats`), and the run's gradient recorder as
              `train_model` opens it (`open_recorder`: the step log, flushed every
              `checkpoint_every` steps, the snapshot policy, and a full snapshot every
              `--snapshot-every` steps handed to the background writer; default settings:
              float32, no weights)
  export off  the same compiled step; only the loss is read

The two take turns every `--chunk` steps, so the machine's drift hits both alike.
Then one snapshot of the trained model written with each storage setting, against its
raw float32 size, and the writer's throughput.

    python benchmarks/export_overhead.py [--steps 600] [--chunk 20] [--snapshot-every 250]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from tapeline.config import RunConfig
from tapeline.gradients.schema import L2_NORM
from tapeline.gradients.stats import gradient_stats
from tapeline.gradients.writers import PARQUET_OPTIONS, snapshot_table
from tapeline.model import build_model
from tapeline.storage.root import Storage
from tapeline.training.batches import batch_sample_ids, batches, epoch_order
from tapeline.training.loop import open_recorder
from tapeline.training.steps import host_arrays, make_train_step, with_stats

DATA = Path("/usr/share/datasets/fashion-mnist")


def load(n: int) -> tuple[np.ndarray, np.ndarray]:
    from tapeline.data.idx import read_idx_gz

    images = read_idx_gz(DATA / "train-images-idx3-ubyte.gz", 3)[:n, :, :, None]
    return np.ascontiguousarray(images), read_idx_gz(DATA / "train-labels-idx1-ubyte.gz", 1)[:n]


class Trainer:
    """One model trained by the project's step functions, with export (the run's recorder) on or off, a chunk of steps at a time."""

    def __init__(self, images, labels, batch_size: int, export: bool, snapshot_every: int, directory: Path):
        keras.utils.set_random_seed(0)
        config = RunConfig(batch_size=batch_size, snapshot_every=snapshot_every)
        self.model, optimizer = build_model(), keras.optimizers.Adam(config.learning_rate)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        step_fn = make_train_step(self.model, optimizer, loss_fn, keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy())
        self.step_fn = with_stats(step_fn) if export else step_fn
        variables = [v.path for v in self.model.trainable_variables]
        self.export, self.step, self.batch_size, self.checkpoint_every = export, 0, batch_size, config.checkpoint_every
        self.order, self.sample_ids = epoch_order(len(images), 0, 1), np.arange(len(images))
        self.steps_per_epoch = -(-len(images) // batch_size)
        self.batches = iter(batches(tf.constant(images), tf.constant(labels), self.order, batch_size).repeat())
        storage = Storage(directory)
        self.recorder = open_recorder(config, storage, storage.layout.run("bench"), variables, optimizer, last_step=10**9, writes=True)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            x, y = next(self.batches)
            if not self.export:
                float(self.step_fn(x, y)[0])
                self.step += 1
                continue
            self.recorder.before_step(self.step + 1, self.model.trainable_variables)
            loss, gradients, stats, _ = self.step_fn(x, y)
            self.step += 1
            batch = batch_sample_ids(self.sample_ids, self.order, (self.step - 1) % self.steps_per_epoch, self.batch_size)
            self.recorder.record(self.step, 1, float(loss), batch, stats.numpy(), gradients)
            if self.step % self.checkpoint_every == 0:  # where the loop flushes the log, before a checkpoint
                self.recorder.flush()

    def close(self) -> None:
        self.recorder.flush()
        self.recorder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="timed steps per method")
    parser.add_argument("--chunk", type=int, default=20, help="steps per turn: short turns pair the methods against drift")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--snapshot-every", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=5, help="writes of the one snapshot, per storage setting")
    args = parser.parse_args()
    images, labels = load(20000)
    with tempfile.TemporaryDirectory() as scratch:
        trainers = {
            "export on": Trainer(images, labels, args.batch_size, True, args.snapshot_every, Path(scratch) / "on"),
            "export off": Trainer(images, labels, args.batch_size, False, args.snapshot_every, Path(scratch) / "off"),
        }
        for trainer in trainers.values():  # compile, not timed
            trainer.run(10)
        seconds = {name: 0.0 for name in trainers}
        for _ in range(args.steps // args.chunk):
            for name, trainer in trainers.items():
                started = time.perf_counter()
                trainer.run(args.chunk)
                seconds[name] += time.perf_counter() - started
        for trainer in trainers.values():
            trainer.close()
        rate = {name: args.steps * args.batch_size / s for name, s in seconds.items()}
        print(f"batch {args.batch_size}, {args.steps} steps each in turns of {args.chunk}, snapshot every {args.snapshot_every} steps")
        for name in trainers:
            print(f"{name:<12}{rate[name]:>10,.0f} samples/s")
        print(f"export on / off = {rate['export on'] / rate['export off']:.3f}")

        # One snapshot of the trained model's gradients, stored each way.
        model = trainers["export on"].model
        x, y = images[:32], labels[:32]
        with tf.GradientTape() as tape:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(x, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        norms = gradient_stats(gradients).numpy()[:, L2_NORM]
        raw = sum(g.numpy().nbytes for g in gradients)
        variables = [v.path for v in model.trainable_variables]
        print(f"\none snapshot: {raw / 1e6:.2f} MB of float32; median of {args.repeats} writes (device-to-host copy, table, file)")
        for label, dtype, options in (
            ("pyarrow defaults", "float32", {}),
            ("tapeline float32", "float32", PARQUET_OPTIONS),
            ("tapeline float16", "float16", PARQUET_OPTIONS),
        ):
            path, times = Path(scratch) / f"{label}.parquet", []
            for _ in range(args.repeats):
                started = time.perf_counter()
                table = snapshot_table("bench", 1, "first", variables, host_arrays(gradients, dtype), norms, dtype=dtype)
                pq.write_table(table, path, **options)
                times.append(time.perf_counter() - started)
            size = path.stat().st_size
            print(f"{label:<18}{size / 1e6:>7.2f} MB  {size / raw:.2f}x raw  {raw / 1e6 / np.median(times):>6.0f} MB/s")


if __name__ == "__main__":
    main()
