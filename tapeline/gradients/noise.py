"""The gradient noise of each step, from its per-example norms, and its smoothing for reports.

McCandlish et al. 2018, *An Empirical Model of Large-Batch Training*, appendix A, with
B_small = 1 and B_big = B (formulas: docs/data-format.md#samples-and-gradient-noise).
The estimates per step are unbiased, but their ratio B_simple is not, and swings
wherever the signal's estimate comes near zero: the paper averages numerator and
denominator separately, so the smoothed noise scale is the ratio of the exponential
moving averages of tr Σ and ‖𝒢‖².
"""

from __future__ import annotations

import numpy as np

DECAY = 0.99  # per step: the averages weigh roughly the last 100 steps, the anomaly window's length


def noise_estimates(per_example_squared: np.ndarray, sizes: np.ndarray, batch_squared: np.ndarray) -> np.ndarray:
    """[steps, NOISE_COLUMNS] float32: tr Σ, ‖𝒢‖², B_simple of each step; NaN for a batch of one.

    `per_example_squared`: ‖gᵢ‖² of every example of the steps, in order; `sizes`: each
    step's batch size; `batch_squared`: each step's ‖G‖². With m = mean ‖gᵢ‖² over the batch:
    tr Σ ≈ (m − ‖G‖²)/(1 − 1/B), ‖𝒢‖² ≈ (B‖G‖² − m)/(B − 1), B_simple = tr Σ / ‖𝒢‖²,
    in float64: with little noise the differences nearly cancel.
    """
    b = np.asarray(sizes, np.float64)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    m = np.add.reduceat(np.asarray(per_example_squared, np.float64), starts) / b
    g = np.asarray(batch_squared, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        variance, signal = (m - g) / (1.0 - 1.0 / b), (b * g - m) / (b - 1.0)
        estimates = np.stack([variance, signal, variance / signal], axis=1)
    estimates[b <= 1] = np.nan
    return estimates.astype(np.float32)


def smoothed_noise_scale(variance: np.ndarray, signal: np.ndarray, decay: float = DECAY) -> np.ndarray:
    """EMA(tr Σ) / EMA(‖𝒢‖²) at every step; NaN until the signal's average is positive.

    Steps where either estimate is not finite (a batch of one) are skipped: the
    averages carry over. Both start at 0 with the same weights, so their ratio needs
    no bias correction.
    """
    smoothed = np.full(len(variance), np.nan)
    mean_variance = mean_signal = 0.0
    for i, (v, s) in enumerate(zip(np.asarray(variance, np.float64), np.asarray(signal, np.float64))):
        if np.isfinite(v) and np.isfinite(s):
            mean_variance, mean_signal = decay * mean_variance + (1 - decay) * v, decay * mean_signal + (1 - decay) * s
        if mean_signal > 0:  # a non-positive estimate of the signal has no meaningful ratio
            smoothed[i] = mean_variance / mean_signal
    return smoothed
