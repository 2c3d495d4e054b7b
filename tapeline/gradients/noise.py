"""The gradient noise of each step, from its per-example norms, and its smoothing for reports.

McCandlish et al. 2018, *An Empirical Model of Large-Batch Training*, appendix A, with
B_small = 1 and B_big = B (formulas: docs/data-format.md#samples-and-gradient-noise).
The estimates per step are unbiased, but their ratio B_simple is not, and swings
wherever the signal's estimate comes near zero: the paper averages numerator and
denominator separately, so the smoothed noise scale is the ratio of the exponential
moving averages of tr Σ and ‖𝒢‖².

The one number a run records (run.json, TensorBoard's HParams) is the median of the
smoothed value over the last epoch, named for what it is: NOISE_SCALE_METRIC. The
three statistics, and where each is shown: docs/data-format.md#samples-and-gradient-noise.
"""

from __future__ import annotations

import numpy as np

DECAY = 0.99  # per step: the averages weigh roughly the last 100 steps, the anomaly window's length
NOISE_SCALE_METRIC = "noise_scale_smoothed_median_last_epoch"  # run.json's key, TensorBoard's metrics/ tag


def noise_estimates(per_example_squared: np.ndarray, sizes: np.ndarray, batch_squared: np.ndarray) -> dict[str, np.ndarray]:
    """Each step's tr Σ, ‖𝒢‖² and B_simple, float32, by their `steps/` columns; NaN for a batch of one.

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
        estimates = {"grad_variance": variance, "grad_signal": signal, "grad_noise_scale": variance / signal}
    return {name: np.where(b > 1, values, np.nan).astype(np.float32) for name, values in estimates.items()}


class NoiseSmoother:
    """EMA(tr Σ) / EMA(‖𝒢‖²), one step at a time (TensorBoard's scalars as the steps come).

    A step where either estimate is not finite (a batch of one) is skipped: the
    averages carry over. Both start at 0 with the same weights, so their ratio needs
    no bias correction.
    """

    def __init__(self, decay: float = DECAY):
        self.decay, self.variance, self.signal = decay, 0.0, 0.0

    def update(self, variance: float, signal: float) -> float:
        """Fold in one step's estimates; the smoothed noise scale after it, NaN until the signal's average is positive."""
        if np.isfinite(variance) and np.isfinite(signal):
            self.variance = self.decay * self.variance + (1 - self.decay) * variance
            self.signal = self.decay * self.signal + (1 - self.decay) * signal
        return self.variance / self.signal if self.signal > 0 else np.nan  # ‖𝒢‖²'s estimate can come out <= 0


def smoothed_noise_scale(variance: np.ndarray, signal: np.ndarray, decay: float = DECAY) -> np.ndarray:
    """`NoiseSmoother` over a whole series: the smoothed noise scale at every step."""
    smoother = NoiseSmoother(decay)
    return np.array([smoother.update(v, s) for v, s in zip(np.asarray(variance, np.float64), np.asarray(signal, np.float64))])


def median_last_epoch(epochs: np.ndarray, smoothed: np.ndarray) -> float | None:
    """NOISE_SCALE_METRIC: the median of the smoothed noise scale over the steps of the last epoch; None if none has one.

    Smoothed first: a step's raw B_simple is a ratio of two noisy estimates, often
    negative, and a median of raw values would be pulled far below the noise scale.
    """
    epochs, smoothed = np.asarray(epochs), np.asarray(smoothed, np.float64)
    if not len(epochs):
        return None
    last = smoothed[(epochs == epochs.max()) & np.isfinite(smoothed)]
    return float(np.median(last)) if len(last) else None
