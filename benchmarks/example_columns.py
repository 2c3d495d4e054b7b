"""What `margin` and `p_label` cost the compiled step: the step with them against the step without, in one process.

Two compiled training steps with per-example norms on (tapeline/training/steps.py), each
with its own model and optimizer: `on` computes every per-example column
(per_example.example_columns); `off` the columns the samples had before these two
(label, predicted, loss, correct), zeros in their place, so both pack and return the same
rows. They take turns, `--steps` steps each, in `--rounds` rounds after one warm-up round,
on the same batch of `--batch-size` Fashion-MNIST-shaped images. Reported: each one's
median samples/s and the per-round ratio on / off (paired), with the load and the machine.

    python benchmarks/example_columns.py [--rounds 10] [--steps 200] [--batch-size 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from label_flip import machine  # noqa: E402

import tapeline.training.steps as steps  # noqa: E402
from tapeline.gradients.per_example import example_columns  # noqa: E402
from tapeline.model import build_model  # noqa: E402


def without_margin(labels, logits, losses) -> dict:
    """The columns before `margin` and `p_label`: theirs zeros, computed from nothing."""
    labels = tf.cast(labels, tf.int32)
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    zeros = tf.zeros_like(losses)
    return {"label": labels, "predicted": predicted, "loss": losses, "correct": tf.equal(predicted, labels), "margin": zeros, "p_label": zeros}


def compiled_step(columns, images: tf.Tensor, labels: tf.Tensor) -> callable:
    """A fresh model's compiled step with per-example norms, its per-example columns from `columns`: traced here, on
    a first call, while the steps module's `example_columns` is `columns`."""
    steps.example_columns = columns
    try:
        model, optimizer = build_model(), keras.optimizers.Adam(1e-3)
        optimizer.build(model.trainable_variables)
        step = steps.make_train_step(model, optimizer, keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy())
        step(images, labels)
    finally:
        steps.example_columns = example_columns
    return step


def turn(step, images, labels, count: int) -> float:
    """samples/s over `count` steps (the rows copied to the host each step, as the loop does)."""
    started = time.perf_counter()
    for _ in range(count):
        _, _, rows = step(images, labels)
        rows.numpy()
    return count * len(labels) / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (args.batch_size, 28, 28, 1), dtype=np.uint8))
    labels = tf.constant(rng.integers(0, 10, args.batch_size, dtype=np.uint8))
    variants = {"on": compiled_step(example_columns, images, labels), "off": compiled_step(without_margin, images, labels)}
    load_before = os.getloadavg()[0]
    speeds = {name: [] for name in variants}
    for round_ in range(args.rounds + 1):
        for name, step in variants.items() if round_ % 2 else reversed(variants.items()):
            speed = turn(step, images, labels, args.steps)
            if round_:  # the first round warms up (tracing, compiling)
                speeds[name].append(speed)
    ratios = [on / off for on, off in zip(speeds["on"], speeds["off"])]
    for name, values in speeds.items():
        print(f"{name:3}: median {statistics.median(values):,.0f} samples/s ({min(values):,.0f}–{max(values):,.0f})")
    print(f"on / off, paired: median {statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f}), {len(ratios)} rounds")
    print(f"batch {args.batch_size}, {args.steps} steps a turn; load average {load_before:.1f} -> {os.getloadavg()[0]:.1f}; machine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
