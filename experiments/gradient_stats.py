"""Ways to compute one step's gradient statistics (`gradient_stats`'s columns), timed on real gradients.

The gradients are the model's own after a few real training steps (`build_training`,
Fashion-MNIST from /usr/share/datasets/fashion-mnist or random bytes, batch 32: the dense
kernel's gradient is 21,632 × 128 float32, 11 MB, with the ReLU's zeros). Each candidate
returns the same [variables, STAT_NAMES] table; before timing, each is checked against
float64 sums of those gradients and against `gradient_stats` on copies holding a NaN and
an Inf (`check`); one that differs is timed anyway and marked *. "before" is
`gradient_stats` with zeros counted by a float32 mask (its former rule), "now" the
module's (`zero_count`).

Timing: each candidate runs inside a `tf.function` as in the k-step call, a `tf.while_loop`
of `--repeats` iterations with the gradients carried as loop variables (so nothing is
hoisted out), one turn per candidate per round, candidates interleaved over `--rounds`
rounds. Reported per candidate: the median µs per statistics computation with its spread
(min-max), and its ratio to "before" paired by round. Rows "ref:" are not candidates:
one reduction of the dense kernel alone (to split the cost by column), the per-variable
L2 norms alone (what statistics off still computes), and the loop with no statistics
(its time is in every row).

    python experiments/gradient_stats.py [--rounds 30] [--repeats 40] [--only PART_OF_NAME ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from tapeline.config import RunConfig
from tapeline.data.idx import read_idx_gz
from tapeline.data.registry import FASHION_MNIST
from tapeline.gradients.stats import gradient_stats
from tapeline.training.loop import build_training

DATA = Path("/usr/share/datasets/fashion-mnist")
BIG = 2  # the dense kernel's index among the model's trainable variables


# --- pieces -------------------------------------------------------------------------------------------------------


def _flat(gradients):
    return [tf.reshape(tf.cast(g, tf.float32), [-1]) for g in gradients]


def _table(flat, total, squares, max_abs, zeros, nan_max=False):
    """The arithmetic once for all variables, and the NaN/Inf counts only when a sum is not finite, as gradient_stats.

    `nan_max`: max_abs made NaN where the variable holds a NaN (XLA's max skips NaN, TensorFlow's propagates it).
    """
    size = tf.constant([g.shape.num_elements() for g in flat], tf.float32)
    counts = tf.cond(
        tf.reduce_all(tf.math.is_finite(total + squares)),
        lambda: tf.zeros([len(flat), 2]),
        lambda: tf.stack([[tf.reduce_sum(tf.cast(tf.math.is_nan(g), tf.float32)), tf.reduce_sum(tf.cast(tf.math.is_inf(g), tf.float32))] for g in flat]),
    )
    if nan_max:
        max_abs = tf.where(counts[:, 0] > 0, tf.constant(np.nan, tf.float32), max_abs)
    mean = total / size
    std = tf.sqrt(tf.maximum(squares / size - mean * mean, 0.0))
    return tf.concat([tf.stack([tf.sqrt(squares), mean, std, max_abs, zeros / size], axis=1), counts], axis=1)


def _sum(g):
    return tf.reduce_sum(g)


def _squares(g):
    return 2.0 * tf.nn.l2_loss(g)


def _max_abs(g):
    return tf.maximum(tf.reduce_max(g), -tf.reduce_min(g))


def _zeros(g):
    return tf.reduce_sum(tf.cast(tf.equal(g, 0.0), tf.float32))


def per_tensor(sum_=_sum, squares=_squares, max_abs=_max_abs, zeros=_zeros):
    """A candidate that computes each column per tensor with the given reductions."""

    def stats(gradients):
        flat = _flat(gradients)
        return _table(
            flat,
            tf.stack([sum_(g) for g in flat]),
            tf.stack([squares(g) for g in flat]),
            tf.stack([max_abs(g) for g in flat]),
            tf.stack([zeros(g) for g in flat]),
        )

    return stats


def _columns(flat):
    return tf.stack([_sum(flat)]), tf.stack([_squares(flat)]), tf.stack([_max_abs(flat)]), tf.stack([_zeros(flat)])


def small_segments(gradients):
    """The small tensors concatenated into one vector and reduced by segment (fewer ops); the big one as today."""
    flat = _flat(gradients)
    small = [g for i, g in enumerate(flat) if i != BIG]
    ids = tf.constant(np.repeat(np.arange(len(small)), [g.shape.num_elements() for g in small]), tf.int32)
    joined = tf.concat(small, 0)
    big = flat[BIG]
    columns = [
        (tf.math.segment_sum(joined, ids), _sum(big)),
        (tf.math.segment_sum(joined * joined, ids), _squares(big)),
        (tf.maximum(tf.math.segment_max(joined, ids), -tf.math.segment_min(joined, ids)), _max_abs(big)),
        (tf.math.segment_sum(tf.cast(tf.equal(joined, 0.0), tf.float32), ids), _zeros(big)),
    ]
    return _table(flat, *[tf.concat([s[:BIG], big_value[None], s[BIG:]], 0) for s, big_value in columns])


def big_by_columns(gradients):
    """The big kernel reduced over its rows first (to 128 values), then those: another split of the work across threads."""
    flat = _flat(gradients)
    big = tf.reshape(tf.cast(gradients[BIG], tf.float32), [-1, gradients[BIG].shape[-1]])

    def pick(f, big_value):
        return tf.stack([big_value if i == BIG else f(g) for i, g in enumerate(flat)])

    return _table(
        flat,
        pick(_sum, tf.reduce_sum(tf.reduce_sum(big, 0))),
        pick(_squares, tf.reduce_sum(tf.reduce_sum(tf.square(big), 0))),
        pick(_max_abs, tf.maximum(tf.reduce_max(tf.reduce_max(big, 0)), -tf.reduce_min(tf.reduce_min(big, 0)))),
        pick(_zeros, tf.reduce_sum(tf.reduce_sum(tf.cast(tf.equal(big, 0.0), tf.float32), 0))),
    )


def big_by_matmul(gradients):
    """The big kernel's sum and sum of squares as matrix products (oneDNN, multi-threaded): g @ 1 and g·g."""
    flat = _flat(gradients)
    big = tf.reshape(tf.cast(gradients[BIG], tf.float32), [-1, gradients[BIG].shape[-1]])
    column = tf.reshape(flat[BIG], [-1, 1])

    def pick(f, big_value):
        return tf.stack([big_value if i == BIG else f(g) for i, g in enumerate(flat)])

    return _table(
        flat,
        pick(_sum, tf.reduce_sum(tf.linalg.matvec(big, tf.ones([big.shape[1]])))),
        pick(_squares, tf.reshape(tf.matmul(column, column, transpose_a=True), [])),
        pick(_max_abs, _max_abs(flat[BIG])),
        pick(_zeros, _zeros(flat[BIG])),
    )


def moments(gradients):
    """tf.nn.moments for the mean and variance (the squares from them)."""
    flat = _flat(gradients)
    pairs = [tf.nn.moments(g, axes=[0]) for g in flat]
    size = tf.constant([g.shape.num_elements() for g in flat], tf.float32)
    mean, variance = tf.stack([m for m, _ in pairs]), tf.stack([v for _, v in pairs])
    return _table(flat, mean * size, (variance + mean * mean) * size, tf.stack([_max_abs(g) for g in flat]), tf.stack([_zeros(g) for g in flat]))


def one_pass_xla(part, nan_max=False):
    """The columns under XLA (one fused, multi-output reduction per tensor) for the tensors `part` picks; the rest as today."""

    @tf.function(jit_compile=True)
    def compiled(tensors):
        return [tf.stack(c) for c in zip(*[(_sum(g), _squares(g), _max_abs(g), _zeros(g)) for g in tensors])]

    def stats(gradients):
        flat = _flat(gradients)
        chosen = [i for i in range(len(flat)) if part(i)]
        rest = [i for i in range(len(flat)) if not part(i)]
        fast = compiled([flat[i] for i in chosen]) if chosen else None
        columns = []
        for c, f in enumerate((_sum, _squares, _max_abs, _zeros)):
            values = {i: fast[c][n] for n, i in enumerate(chosen)} | {i: f(flat[i]) for i in rest}
            columns.append(tf.stack([values[i] for i in range(len(flat))]))
        return _table(flat, *columns, nan_max=nan_max)

    return stats


def big_halves_xla(gradients):
    """The big kernel split in two row halves (no copy), each half one XLA reduction, so the two can run on the two cores."""

    @tf.function(jit_compile=True)
    def half(g):
        return tf.stack([_sum(g), _squares(g), tf.reduce_max(g), tf.reduce_min(g), _zeros(g)])

    flat = _flat(gradients)
    top, bottom = tf.split(tf.cast(gradients[BIG], tf.float32), 2, axis=0)
    a, b = half(top), half(bottom)
    big = [a[0] + b[0], a[1] + b[1], tf.maximum(tf.maximum(a[2], b[2]), -tf.minimum(a[3], b[3])), a[4] + b[4]]
    columns = []
    for c, f in enumerate((_sum, _squares, _max_abs, _zeros)):
        columns.append(tf.stack([big[c] if i == BIG else f(g) for i, g in enumerate(flat)]))
    return _table(flat, *columns, nan_max=True)


def _zeros_int32(g):
    return tf.cast(tf.reduce_sum(tf.cast(tf.equal(g, 0.0), tf.int32)), tf.float32)


def _zeros_uint8_rows(g):
    """Zeros counted in uint8 along rows of at most 255 (no overflow), then the row counts in int32: a 1-byte temporary."""
    width = next(w for w in range(min(255, g.shape.num_elements()), 0, -1) if g.shape.num_elements() % w == 0)
    rows = tf.reduce_sum(tf.cast(tf.reshape(tf.equal(g, 0.0), [-1, width]), tf.uint8), axis=1)
    return tf.cast(tf.reduce_sum(tf.cast(rows, tf.int32)), tf.float32)


def sign_zeros(gradients):
    """Zeros as size - sum(sign(g)^2): one element-wise pass and one reduction (l2_loss), no mask and no cast.

    Exact while the tensor is finite and below 2^24 elements (the sum of ones is an
    integer float32 holds exactly); sign(NaN) is NaN, so the non-finite branch, which
    already reads each tensor again, counts the zeros with the mask there.
    """
    flat = _flat(gradients)
    size = tf.constant([g.shape.num_elements() for g in flat], tf.float32)
    total, squares = tf.stack([_sum(g) for g in flat]), tf.stack([_squares(g) for g in flat])
    fast_zeros = size - tf.stack([2.0 * tf.nn.l2_loss(tf.sign(g)) for g in flat])
    counts = tf.cond(
        tf.reduce_all(tf.math.is_finite(total + squares)),
        lambda: tf.concat([tf.zeros([len(flat), 2]), fast_zeros[:, None]], 1),
        lambda: tf.stack(
            [[tf.reduce_sum(tf.cast(tf.math.is_nan(g), tf.float32)), tf.reduce_sum(tf.cast(tf.math.is_inf(g), tf.float32)), _zeros(g)] for g in flat]
        ),
    )
    mean = total / size
    std = tf.sqrt(tf.maximum(squares / size - mean * mean, 0.0))
    max_abs = tf.stack([_max_abs(g) for g in flat])
    return tf.concat([tf.stack([tf.sqrt(squares), mean, std, max_abs, counts[:, 2] / size], axis=1), counts[:, :2]], axis=1)


def big_only(reduction):
    """Reference: one reduction of the big kernel alone, to split the cost by column."""

    def stats(gradients):
        return tf.fill([len(gradients), 7], reduction(tf.reshape(gradients[BIG], [-1])))

    return stats


def norms_only(gradients):
    """Reference, not a candidate: the per-variable L2 norms alone (what statistics off still needs for the anomaly watch)."""
    flat = _flat(gradients)
    return tf.pad(tf.sqrt(tf.stack([_squares(g) for g in flat]))[:, None], [[0, 0], [0, 6]])


def loop_only(gradients):
    """Reference: the timing loop with no statistics."""
    return tf.zeros([len(gradients), 7])


CANDIDATES = {
    "before (float32 zero mask)": per_tensor(),
    "now (gradient_stats)": gradient_stats,
    "zeros: size - count_nonzero": per_tensor(zeros=lambda g: tf.cast(tf.size(g), tf.float32) - tf.cast(tf.math.count_nonzero(g), tf.float32)),
    "zeros: tf.math.zero_fraction": per_tensor(zeros=lambda g: tf.math.zero_fraction(g) * tf.cast(tf.size(g), tf.float32)),
    "zeros: int32 mask": per_tensor(zeros=_zeros_int32),
    "zeros: size - l2_loss(sign)": sign_zeros,
    "max_abs: reduce_max(abs)": per_tensor(max_abs=lambda g: tf.reduce_max(tf.abs(g))),
    "squares: reduce_sum(g*g)": per_tensor(squares=lambda g: tf.reduce_sum(g * g)),
    "squares: tensordot(g, g)": per_tensor(squares=lambda g: tf.tensordot(g, g, 1)),
    "small tensors by segment": small_segments,
    "big: rows first": big_by_columns,
    "big: sums by matmul": big_by_matmul,
    "tf.nn.moments": moments,
    "XLA: all": tf.function(jit_compile=True)(lambda gradients: gradient_stats.python_function(gradients)),
    "XLA: one pass, every tensor": one_pass_xla(lambda i: True),
    "XLA: one pass, big only": one_pass_xla(lambda i: i == BIG),
    "XLA: one pass, small only": one_pass_xla(lambda i: i != BIG),
    "XLA: one pass, big, NaN max": one_pass_xla(lambda i: i == BIG, nan_max=True),
    "XLA: big in two halves": big_halves_xla,
    "ref: big: reduce_sum": big_only(_sum),
    "ref: big: l2_loss": big_only(_squares),
    "ref: big: max and min": big_only(_max_abs),
    "ref: big: zeros, float mask": big_only(_zeros),
    "ref: big: zeros, int32 mask": big_only(_zeros_int32),
    "ref: big: zeros, uint8 rows": big_only(_zeros_uint8_rows),
    "ref: big: zeros, l2_loss(sign)": big_only(lambda g: 2.0 * tf.nn.l2_loss(tf.sign(g))),
    "ref: l2 norms only": norms_only,
    "ref: loop only": loop_only,
}


# --- gradients, checks, timing --------------------------------------------------------------------------------------


def real_gradients(steps: int, batch_size: int) -> list[tf.Tensor]:
    """The gradients of the last of `steps` real training steps (as the step returns them)."""
    n = steps * batch_size
    if (DATA / "train-images-idx3-ubyte.gz").exists():
        images = read_idx_gz(DATA / "train-images-idx3-ubyte.gz", 3)[:n, :, :, None]
        labels = read_idx_gz(DATA / "train-labels-idx1-ubyte.gz", 1)[:n]
    else:
        rng = np.random.default_rng(0)
        images, labels = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)
    training = build_training(RunConfig(batch_size=batch_size), FASHION_MNIST.shape)
    for start in range(0, n, batch_size):
        _, gradients = training.train_step(tf.constant(images[start : start + batch_size]), tf.constant(labels[start : start + batch_size]))
    return [tf.identity(g) for g in gradients]


def with_value(gradients, index: int, value: float) -> list[tf.Tensor]:
    array = gradients[index].numpy().copy()
    array.flat[7] = value
    return [tf.constant(array) if i == index else g for i, g in enumerate(gradients)]


def check(name: str, candidate, gradients) -> str:
    """'' if `candidate` gives what gradient_stats gives, on these gradients and on copies holding a NaN and an Inf; else how not.

    Finite gradients: against float64 sums, each within 1e-5 (the mean relative to the
    mean |g|: a signed sum loses relative precision to cancellation in any order), the
    largest |g|, the zero fraction and the counts exactly. NaN and Inf: the same
    columns NaN, Inf and finite as gradient_stats, and equal counts.
    """
    if name.startswith("ref:"):
        return ""
    got = tf.function(candidate)(gradients).numpy()
    for i, g in enumerate(gradients):
        values = g.numpy().astype(np.float64).ravel()
        scale = np.array([np.sqrt(np.sum(values**2)), np.mean(np.abs(values)) + 1e-30, values.std() + 1e-30])
        error = np.abs(got[i, :3] - [np.sqrt(np.sum(values**2)), values.mean(), values.std()]) / scale
        if error.max() > 1e-5 or got[i, 3] != np.abs(values).max() or got[i, 4] != np.float32(np.mean(values == 0)) or got[i, 5:].any():
            return f"finite gradients, variable {i}: errors {error.tolist()}, row {got[i].tolist()}"
    for case in (with_value(gradients, BIG, np.nan), with_value(gradients, 1, np.inf)):
        expected, got = gradient_stats(case).numpy(), tf.function(candidate)(case).numpy()
        kinds = [np.where(np.isnan(t), 2, np.where(np.isinf(t), 1, 0)) for t in (expected, got)]
        if not (np.array_equal(*kinds) and np.array_equal(expected[:, 4:], got[:, 4:])):
            rows = np.any(kinds[0] != kinds[1], axis=1)
            return f"non-finite case: gradient_stats {expected[rows].tolist()}, this {got[rows].tolist()}"
    return ""


def timed_loop(candidate, repeats: int):
    @tf.function
    def run(gradients):
        def body(i, total, gs):
            return i + 1, total + tf.reduce_sum(candidate(gs)), gs

        return tf.while_loop(lambda i, *_: i < repeats, body, (tf.constant(0), tf.constant(0.0), list(gradients)), parallel_iterations=1)[1]

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=40, help="statistics computed per turn")
    parser.add_argument("--train-steps", type=int, default=30, help="real training steps before the gradients are taken")
    parser.add_argument("--only", action="append", help="candidates whose name contains this (repeatable; before and now always run)")
    args = parser.parse_args()
    tf.get_logger().setLevel("ERROR")  # each candidate is traced in its own function: retracing warnings

    gradients = real_gradients(args.train_steps, 32)
    print("gradients:", ", ".join(f"{list(g.shape)} ({np.mean(g.numpy() == 0):.1%} zeros)" for g in gradients))
    chosen = {n: c for n, c in CANDIDATES.items() if n.startswith(("before", "now")) or not args.only or any(o in n for o in args.only)}
    runs = {}
    for name, candidate in chosen.items():
        problem = check(name, candidate, gradients)
        if problem:
            print(f"differs from gradient_stats (timed anyway, marked *): {name}: {problem}")
            name += " *"
        runs[name] = timed_loop(candidate, args.repeats)
        runs[name](gradients).numpy()  # trace and compile, not timed
    load_before = os.getloadavg()
    micros: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            started = time.perf_counter()
            run(gradients).numpy()
            micros[name].append((time.perf_counter() - started) / args.repeats * 1e6)
    load_after = os.getloadavg()

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, TensorFlow {tf.__version__}; "
        f"{args.rounds} rounds x {args.repeats} per turn; load average {load_before[0]:.2f} before, {load_after[0]:.2f} after"
    )
    current = micros["before (float32 zero mask)"]
    print(f"{'candidate':<30}{'median µs':>10}  {'min-max':>13}  {'/ before, paired (min-max)':>28}")
    for name, values in micros.items():
        ratios = [a / b for a, b in zip(values, current)]
        print(
            f"{name:<30}{statistics.median(values):>10,.0f}  {min(values):>6,.0f}-{max(values):<6,.0f}  "
            f"{statistics.median(ratios):>10.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
