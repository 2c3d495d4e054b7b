"""The whole train stage against Keras `model.fit`, and per-example norms on against off, in one process, taking turns.

Each turn trains from scratch, as a user's run does, on the same data (the first
`--train-limit` Fashion-MNIST training samples, `--validation-size` of them held out),
`--epochs` epochs at `--batch-size`:

  stage          `tapeline.training.loop.train_model`, what the flow's train task runs: reading the
                 splits, building, tracing and compiling, per-step statistics, per-example norms
                 and the samples dataset, snapshots every 250 steps, checkpoints every 500 and at
                 each epoch's end, validation, saving the model
  stage, no per-example   the same with `per_example_norms=False`
  fit            `build_model()`, `compile`, `fit(x, y, validation_data=…, epochs, batch_size)`,
                 saving the model

After a first round that is not counted (the process's start-up), the methods take
turns in `--rounds` rounds. Reported: each method's median wall time
and samples/s with their spread, every turn, and per round the ratios stage/fit and
on/off (paired: the same round, minutes apart at most), with their medians and spread,
the load average and the machine.

    python benchmarks/train_stage.py [--rounds 4] [--epochs 2] [--train-limit 20000] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import tempfile
import time

import keras
import tensorflow as tf

from tapeline.config import RunConfig
from tapeline.data.fetch import fetch_files
from tapeline.data.splits import prepare, read_split
from tapeline.model import build_model
from tapeline.storage.root import Storage
from tapeline.training.loop import train_model

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def stage(config: RunConfig, data, name: str):
    def run(turn: int) -> None:
        train_model(config, data, f"{name}-{turn}")

    return run


def fit(config: RunConfig, data, directory: str):
    images, labels, _ = read_split(data.uris["train"], config.train_limit)
    validation = read_split(data.uris["validation"])[:2]

    def run(turn: int) -> None:
        model = build_model()
        model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), metrics=["accuracy"],
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
        model.fit(images, labels, batch_size=config.batch_size, epochs=config.epochs, validation_data=validation, verbose=0)
        model.save(f"{directory}/fit-{turn}.keras")

    return run


def median_spread(values: list[float], form: str = "{:.2f}") -> str:
    return f"{form.format(statistics.median(values))} ({form.format(min(values))}-{form.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=20_000)
    parser.add_argument("--validation-size", type=int, default=5_000)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as directory:
        config = RunConfig(
            dataset="fashion-mnist", source=FASHION_MNIST, storage=directory, epochs=args.epochs, batch_size=args.batch_size,
            train_limit=args.train_limit, validation_size=args.validation_size,
        ).validated()  # fmt: skip
        storage = Storage(config.storage)
        data = prepare(fetch_files(config.dataset, storage, config.source), storage, config.seed, config.validation_size)
        methods = {
            "stage": stage(config, data, "on"),
            "stage, no per-example": stage(dataclasses.replace(config, per_example_norms=False), data, "off"),
            "fit": fit(config, data, directory),
        }
        for run in methods.values():  # a first round, not counted: the process's own start-up (TensorFlow, XLA, oneDNN)
            run(-1)
        seconds: dict[str, list[float]] = {name: [] for name in methods}
        load_before = os.getloadavg()
        for turn in range(args.rounds):
            for name, run in methods.items():
                started = time.perf_counter()
                run(turn)
                seconds[name].append(time.perf_counter() - started)
                print(f"round {turn + 1}: {name:<22} {seconds[name][-1]:6.1f} s", flush=True)
        report(args, seconds, load_before, os.getloadavg())


def report(args, seconds: dict[str, list[float]], load_before, load_after) -> None:
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}; {args.rounds} rounds of {args.epochs} epochs x {args.train_limit:,} samples "
          f"(validation: {args.validation_size:,} more) at batch {args.batch_size}; load {load_before[0]:.1f} -> {load_after[0]:.1f}")  # fmt: skip
    for name, values in seconds.items():
        print(f"{name:<22} {median_spread(values, '{:.1f}')} s; turns: {' '.join(f'{v:.1f}' for v in values)}")
    ratios = {
        "stage / fit (speed)": [f / s for s, f in zip(seconds["stage"], seconds["fit"])],
        "stage / stage without per-example (speed kept with them on)": [off / on for on, off in zip(seconds["stage"], seconds["stage, no per-example"])],
    }
    for name, values in ratios.items():
        print(f"{name}: {median_spread(values)} over {len(values)} paired rounds")


if __name__ == "__main__":
    main()
