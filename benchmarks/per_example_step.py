"""The compiled training step alone, per-example norms on against off, for a model builder, in interleaved turns.

    python benchmarks/per_example_step.py examples/models.py:row_gru [--shape 28 28 1] [--batch-size 32] [--rounds 10] [--steps 40]

Each turn runs `--steps` steps of `tapeline.training.steps.make_train_step` (XLA) on random uint8 images; the two
variants take turns, `--rounds` rounds after a first untimed turn each (tracing, compiling). Reported: each
variant's median ms/step (min-max) and on / off paired by round (median, min-max).
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import keras
import numpy as np
import tensorflow as tf

from tapeline.gradients.per_example import per_example_plan
from tapeline.training.steps import make_train_step


def builder(spec: str):
    path, name = spec.split(":")
    module_spec = importlib.util.spec_from_file_location("builders", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, name)


def step(build, shape, per_example: bool):
    keras.utils.set_random_seed(0)
    model = build(shape, 10)
    metrics = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()
    return make_train_step(model, keras.optimizers.Adam(1e-3), *metrics, jit_compile=True, per_example=per_example), model


def turn(train_step, x, y, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        loss, _, examples = train_step(x, y)
    (loss if examples is None else examples).numpy()
    return (time.perf_counter() - start) / steps * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="PATH:BUILDER, e.g. examples/models.py:row_gru")
    parser.add_argument("--shape", type=int, nargs="+", default=[28, 28, 1])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    build, shape = builder(args.model), tuple(args.shape)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(0, 256, (args.batch_size, *shape), dtype=np.uint8))
    y = tf.constant(rng.integers(0, 10, args.batch_size, dtype=np.uint8))
    variants = {"on": step(build, shape, True), "off": step(build, shape, False)}
    print(per_example_plan(variants["on"][1]).note() or "per-example norms: every layer by its rule")
    for train_step, _ in variants.values():
        turn(train_step, x, y, 2)
    times = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, (train_step, _) in variants.items():
            times[name].append(turn(train_step, x, y, args.steps))
    for name, ms in times.items():
        print(f"{name:4} {statistics.median(ms):8.2f} ms/step ({min(ms):.2f}-{max(ms):.2f})")
    ratios = [on / off for on, off in zip(times["on"], times["off"])]
    print(f"on / off, paired by round: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
