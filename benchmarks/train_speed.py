"""Training speed of the project's compiled GradientTape step vs Keras `model.fit` vs an eager loop.

All three train the same model (`tapeline.model.build_model`) with Keras Adam(1e-3) and
SparseCategoricalCrossentropy(from_logits=True) at the same batch size on the same
uint8 images (Fashion-MNIST from /usr/share/datasets/fashion-mnist, or random bytes of
the same shape if it is missing), in ONE process:

  project  `tapeline.training.steps.make_train_step` (the run's default, XLA-compiled) fed by the
           project's own `batches()` pipeline, reading the loss each step (the gradient
           statistics and export are measured apart, by export_overhead.py)
  project --no-jit  the same step as a plain tf.function
  fit      `model.compile(...)` + `model.fit(x, y, batch_size, epochs=1, verbose=0)`
  eager    the classic loop: GradientTape in Python, no tf.function

Each method is warmed up first (tracing/compiling excluded), then timed `--repeats`
times over `--samples` samples, round-robin so machine drift hits all methods alike.
Reported: median training samples/s, and the ratios project/fit and project/eager.

    python benchmarks/train_speed.py [--samples 20000] [--batch-size 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from tapeline.data.idx import read_idx_gz
from tapeline.model import build_model
from tapeline.training.batches import batches, epoch_order
from tapeline.training.steps import make_train_step

DATA = Path("/usr/share/datasets/fashion-mnist")
WARMUP_STEPS = 20


def load(n: int) -> tuple[np.ndarray, np.ndarray]:
    if (DATA / "train-images-idx3-ubyte.gz").exists():
        images = read_idx_gz(DATA / "train-images-idx3-ubyte.gz", 3)[:n, :, :, None]
        labels = read_idx_gz(DATA / "train-labels-idx1-ubyte.gz", 1)[:n]
        if len(images) == n:
            return np.ascontiguousarray(images), labels
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def setup():
    keras.utils.set_random_seed(0)
    return build_model(), keras.optimizers.Adam(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def project_trainer(images, labels, batch_size, jit_compile):
    """The project's own step (`make_train_step`) and input pipeline (`batches`), as `train_model` runs them."""
    model, optimizer, loss_fn = setup()
    metrics = keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy()
    train_step = make_train_step(model, optimizer, loss_fn, *metrics, jit_compile=jit_compile)
    images_t, labels_t = tf.constant(images), tf.constant(labels)

    def run(n, epoch):
        for x, y in batches(images_t, labels_t, epoch_order(len(images), 0, epoch)[:n], batch_size):
            loss, gradients = train_step(x, y)
            float(loss)  # train_model reads it every step

    return run


def fit_trainer(images, labels, batch_size):
    model, optimizer, loss_fn = setup()
    model.compile(optimizer=optimizer, loss=loss_fn, metrics=["accuracy"])

    def run(n, epoch):
        model.fit(images[:n], labels[:n], batch_size=batch_size, epochs=1, shuffle=True, verbose=0)

    return run


def eager_trainer(images, labels, batch_size):
    model, optimizer, loss_fn = setup()
    train_accuracy = keras.metrics.SparseCategoricalAccuracy()

    def run(n, epoch):
        dataset = tf.data.Dataset.from_tensor_slices((images[:n], labels[:n])).shuffle(n, seed=epoch).batch(batch_size)
        for x, y in dataset:
            with tf.GradientTape() as tape:
                logits = model(x, training=True)
                loss = loss_fn(y, logits)
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            train_accuracy.update_state(y, logits)
        float(loss)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20000, help="samples per timed repeat")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    images, labels = load(args.samples)
    trainers = {
        "project": project_trainer(images, labels, args.batch_size, jit_compile=True),
        "project --no-jit": project_trainer(images, labels, args.batch_size, jit_compile=False),
        "fit": fit_trainer(images, labels, args.batch_size),
        "eager": eager_trainer(images, labels, args.batch_size),
    }
    for run in trainers.values():  # tracing, compiling, first-call allocation: not timed
        run(WARMUP_STEPS * args.batch_size, 0)
    rates = {name: [] for name in trainers}
    for repeat in range(1, args.repeats + 1):
        for name, run in trainers.items():
            started = time.perf_counter()
            run(args.samples, repeat)
            rates[name].append(args.samples / (time.perf_counter() - started))

    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, batch {args.batch_size}, "
          f"{args.samples} samples x {args.repeats} repeats, {len(tf.config.list_physical_devices('GPU'))} GPU")
    print(f"{'method':<20}{'median samples/s':>18}   repeats")
    for name, r in rates.items():
        print(f"{name:<20}{median[name]:>18,.0f}   {', '.join(f'{x:,.0f}' for x in r)}")
    for name in (n for n in trainers if n.startswith("project")):
        print(f"{name}/fit = {median[name] / median['fit']:.2f}x   "
              f"{name}/eager = {median[name] / median['eager']:.2f}x")


if __name__ == "__main__":
    main()
