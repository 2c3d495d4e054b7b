"""Training speed of the product's step loop against Keras `model.fit`, in one process, in many short interleaved turns.

Every method trains the same model (`tapeline.model.build_model`, Adam 1e-3, sparse
cross-entropy from logits) at the same batch size on the same uint8 images
(Fashion-MNIST from /usr/share/datasets/fashion-mnist, or random bytes of that shape):

  product k=K  the run's own loop: `tapeline.training.loop.StepLoop.epoch` (calls of up to K
               steps, batches gathered in the graph, per-step statistics, the run's
               gradient recorder writing the step log and the scheduled snapshots to a
               temporary directory), one epoch of `--steps` steps per turn
  product k=K no per-example  (with `--per-example-off`) the same loop without per-example
               norms (`per_example_norms=False`), to say what they cost
  fit          `model.compile(...)` + `model.fit(x, y, batch_size, epochs=1, verbose=0)`

Each method runs a first turn (tracing, compiling: reported, not counted), then the methods take
turns, `--rounds` rounds of `--steps` steps each. Reported per method: the median
samples/s of all turns with its spread (min-max), the turns that stalled (below
`STALL` × the method's median: on this machine an autotuned input pipeline sometimes
runs a whole turn at a fixed low rate), and per method the ratio to `fit` paired by
round on rounds where neither stalled, and over all rounds; with `--per-example-off`,
also on / off paired by round.

    python benchmarks/train_speed.py [--steps 150] [--rounds 15] [--batch-size 32] [--k 50] [--k 10] [--per-example-off] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tapeline.config import RunConfig
from tapeline.data.idx import read_idx_gz
from tapeline.data.registry import FASHION_MNIST
from tapeline.gradients.recorder import SnapshotPolicy
from tapeline.model import build_model
from tapeline.storage.root import Storage
from tapeline.training.batches import epoch_order
from tapeline.training.checkpoints import TrainingCheckpoint
from tapeline.training.loop import EpochClock, StepLoop, build_training, open_recorder, step_calls

DATA = Path("/usr/share/datasets/fashion-mnist")
STALL = 0.75


def load(n: int) -> tuple[np.ndarray, np.ndarray]:
    if (DATA / "train-images-idx3-ubyte.gz").exists():
        images = read_idx_gz(DATA / "train-images-idx3-ubyte.gz", 3)[:n, :, :, None]
        labels = read_idx_gz(DATA / "train-labels-idx1-ubyte.gz", 1)[:n]
        if len(images) == n:
            return np.ascontiguousarray(images), labels
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


class Product:
    """The run's loop (`StepLoop`), one epoch of the turn's samples per turn, recording into a temporary run directory."""

    def __init__(self, images, labels, batch_size: int, k: int, directory: str, per_example: bool = True):
        keras.utils.set_random_seed(0)
        config = RunConfig(batch_size=batch_size, steps_per_call=k, epochs=10**6, checkpoint_every=10**9, storage=directory, per_example_norms=per_example)
        self.images, steps_per_epoch = images, int(np.ceil(len(images) / batch_size))
        training = build_training(config, FASHION_MNIST.shape)
        storage = Storage(directory)
        run = storage.layout.run("bench")
        variables = [v.path for v in training.model.trainable_variables]
        schedule = SnapshotPolicy(config.snapshot_every, 10**9, config.spike_factor)
        self.recorder = open_recorder(config, storage, run, variables, training.optimizer, schedule, writes=True)
        images_on_device, labels_on_device, per_example = tf.constant(images), tf.constant(labels), training.per_example["norms"]
        calls = step_calls(config, training.train_step, training.model, training.optimizer, images_on_device, labels_on_device, False, per_example)
        checkpoint = TrainingCheckpoint(storage, run.checkpoints, training.model, training.optimizer, [], {})  # never saved
        self.loop = StepLoop(config, calls, self.recorder, schedule, checkpoint, training.model, None, np.arange(len(images)), steps_per_epoch, None)
        self.epoch, self.steps_per_epoch = 0, steps_per_epoch

    def __call__(self) -> None:
        self.epoch += 1
        order = epoch_order(len(self.images), 0, self.epoch)
        self.loop.epoch(self.epoch, (self.epoch - 1) * self.steps_per_epoch, order, EpochClock(), [])
        self.recorder.flush()  # as at an epoch's end


class Fit:
    def __init__(self, images, labels, batch_size: int):
        keras.utils.set_random_seed(0)
        self.model, self.images, self.labels, self.batch_size = build_model(), images, labels, batch_size
        self.model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])

    def __call__(self) -> None:
        self.model.fit(self.images, self.labels, batch_size=self.batch_size, epochs=1, shuffle=True, verbose=0)


def median_spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="steps per turn")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, action="append", help="steps per call of the product's loop (repeatable; default 50)")
    parser.add_argument("--per-example-off", action="store_true", help="also each product loop without per-example norms")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    args = parser.parse_args()

    samples = args.steps * args.batch_size
    images, labels = load(samples)
    with tempfile.TemporaryDirectory() as directory, tf.device(f"/{args.device.upper()}:0"):
        methods = {f"product k={k}": Product(images, labels, args.batch_size, k, f"{directory}/k{k}") for k in args.k or [50]}
        if args.per_example_off:
            methods |= {
                f"product k={k} no per-example": Product(images, labels, args.batch_size, k, f"{directory}/k{k}pe", per_example=False) for k in args.k or [50]
            }
        methods["fit"] = Fit(images, labels, args.batch_size)
        compile_seconds = {}
        for name, run in methods.items():  # a first turn: tracing, compiling, first-call allocation; not counted
            started = time.perf_counter()
            run()
            compile_seconds[name] = time.perf_counter() - started
        rates: dict[str, list[float]] = {name: [] for name in methods}
        load_before = os.getloadavg()
        for _ in range(args.rounds):
            for name, run in methods.items():
                started = time.perf_counter()
                run()
                rates[name].append(samples / (time.perf_counter() - started))
        report(args, methods, rates, compile_seconds, load_before, os.getloadavg())


def report(args, methods, rates, compile_seconds, load_before, load_after) -> None:
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}, Keras {keras.__version__}, "
        f"device {args.device}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps; "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    stalled = {name: [r < STALL * statistics.median(values) for r in values] for name, values in rates.items()}
    print(f"{'method':<30}{'median samples/s':>18}  {'min-max':>15}  stalled  first turn (s)")
    for name, values in rates.items():
        print(f"{name:<30}{statistics.median(values):>18,.0f}  {min(values):>7,.0f}-{max(values):<7,.0f}  {sum(stalled[name]):>7}  {compile_seconds[name]:.1f}")
    for name, values in rates.items():
        print(f"{name} turns: {' '.join(f'{r:,.0f}' for r in values)}")
    for name in methods:
        if name == "fit":
            continue
        paired = [a / b for a, b, sa, sb in zip(rates[name], rates["fit"], stalled[name], stalled["fit"]) if not (sa or sb)]
        every = [a / b for a, b in zip(rates[name], rates["fit"])]
        print(f"{name} / fit: {median_spread(paired)} on {len(paired)} unstalled rounds; {median_spread(every)} over all rounds")
    for name in methods:
        if f"{name} no per-example" in methods:
            print(f"{name} / {name} no per-example: {paired_ratios(rates, stalled, name, f'{name} no per-example')}")


def paired_ratios(rates, stalled, a: str, b: str) -> str:
    paired = [x / y for x, y, sx, sy in zip(rates[a], rates[b], stalled[a], stalled[b]) if not (sx or sy)]
    every = [x / y for x, y in zip(rates[a], rates[b])]
    return f"{median_spread(paired)} on {len(paired)} unstalled rounds; {median_spread(every)} over all rounds"


if __name__ == "__main__":
    main()
