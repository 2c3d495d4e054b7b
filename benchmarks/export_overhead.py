"""What gradient export costs: training samples/s with export on vs off, and bytes per snapshot.

In one process, on the same model, data and batch size, taking turns:

  export on   what `train_model` does each step: the compiled step, the per-step
              statistics (`gradient_stats`), the step log, the snapshot policy, and a
              full snapshot every `--snapshot-every` steps handed to the background
              writer (default settings: float32, no weights)
  export off  the same compiled step; only the loss is read

Then one snapshot of the trained model written with each storage setting, against its
raw float32 size, and the writer's throughput.

    python benchmarks/export_overhead.py [--samples 16000] [--repeats 3] [--snapshot-every 250]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import tensorflow as tf

from tasks.gradients import PARQUET_OPTIONS, SnapshotPolicy, SnapshotWriter, StepLog, snapshot_table
from tasks.model import build_model
from tasks.train import batches, epoch_order, gradient_stats, make_train_step

DATA = Path("/usr/share/datasets/fashion-mnist")


def load(n: int) -> tuple[np.ndarray, np.ndarray]:
    from tasks.idx import read_idx_gz

    images = read_idx_gz(DATA / "train-images-idx3-ubyte.gz", 3)[:n, :, :, None]
    return np.ascontiguousarray(images), read_idx_gz(DATA / "train-labels-idx1-ubyte.gz", 1)[:n]


def trainer(images, labels, batch_size, export: bool, snapshot_every: int, directory: Path):
    keras.utils.set_random_seed(0)
    model, optimizer = build_model(), keras.optimizers.Adam(1e-3)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    step_fn = make_train_step(model, optimizer, loss_fn, keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy())
    variables = [v.path for v in model.trainable_variables]
    images_t, labels_t = tf.constant(images), tf.constant(labels)
    state = {"step": 0}

    def run(n: int, epoch: int) -> None:
        order = epoch_order(len(images), 0, epoch)[:n]
        policy = SnapshotPolicy(snapshot_every, last_step=10**9, spike_factor=10.0)
        log = StepLog(directory, variables)
        with SnapshotWriter(directory / "gradients", "bench", variables) as writer:
            for i, (x, y) in enumerate(batches(images_t, labels_t, order, batch_size)):
                loss, gradients = step_fn(x, y)
                state["step"] += 1
                loss = float(loss)
                if not export:
                    continue
                stats = gradient_stats(gradients).numpy()
                global_norm = float(np.sqrt(np.sum(stats[:, 0] ** 2)))
                log.append(state["step"], epoch, loss, global_norm, 1e-3, order[i * batch_size : (i + 1) * batch_size], stats)
                reason = policy.reason(state["step"], global_norm, True)
                if reason:
                    writer.write(state["step"], epoch, reason, [g.numpy() for g in gradients])
        log.flush()

    return run, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=16000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--snapshot-every", type=int, default=250)
    args = parser.parse_args()
    images, labels = load(args.samples)
    with tempfile.TemporaryDirectory() as scratch:
        runs = {
            "export on": trainer(images, labels, args.batch_size, True, args.snapshot_every, Path(scratch) / "on"),
            "export off": trainer(images, labels, args.batch_size, False, args.snapshot_every, Path(scratch) / "off"),
        }
        for run, _ in runs.values():  # compile, not timed
            run(20 * args.batch_size, 0)
        rates = {name: [] for name in runs}
        for repeat in range(1, args.repeats + 1):
            for name, (run, _) in runs.items():
                started = time.perf_counter()
                run(args.samples, repeat)
                rates[name].append(args.samples / (time.perf_counter() - started))
        median = {name: statistics.median(r) for name, r in rates.items()}
        print(f"batch {args.batch_size}, {args.samples} samples x {args.repeats} repeats, snapshot every {args.snapshot_every} steps")
        for name, r in rates.items():
            print(f"{name:<12}{median[name]:>10,.0f} samples/s   ({', '.join(f'{x:,.0f}' for x in r)})")
        print(f"export on / off = {median['export on'] / median['export off']:.3f}")

        # One snapshot of the trained model's gradients, stored each way.
        model = runs["export on"][1]
        x, y = images[:32], labels[:32]
        with tf.GradientTape() as tape:
            loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(y, model(x, training=True))
        gradients = [g.numpy() for g in tape.gradient(loss, model.trainable_variables)]
        raw = sum(g.nbytes for g in gradients)
        variables = [v.path for v in model.trainable_variables]
        print(f"\none snapshot: {raw / 1e6:.2f} MB of float32")
        for label, dtype, options in (
            ("pyarrow defaults", "float32", {}),
            ("tapeline float32", "float32", PARQUET_OPTIONS),
            ("tapeline float16", "float16", PARQUET_OPTIONS),
        ):
            path = Path(scratch) / f"{label}.parquet"
            started = time.perf_counter()
            pq.write_table(snapshot_table("bench", 1, 1, "first", variables, gradients, dtype=dtype), path, **options)
            seconds = time.perf_counter() - started
            size = path.stat().st_size
            print(f"{label:<18}{size / 1e6:>7.2f} MB  {size / raw:.2f}x raw  {raw / 1e6 / seconds:>6.0f} MB/s")


if __name__ == "__main__":
    main()
