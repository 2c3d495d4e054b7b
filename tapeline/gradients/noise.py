"""Smoothing the gradient noise scale for reports: B_simple per step is too noisy to read raw.

The estimates per step (tapeline/gradients/per_example.py, formulas in
docs/data-format.md#samples-and-gradient-noise) are unbiased, but their ratio is not,
and swings wherever the signal's estimate comes near zero. McCandlish et al. (2018)
average numerator and denominator separately: the smoothed noise scale is the ratio of
the exponential moving averages of tr Σ and ‖𝒢‖².
"""

from __future__ import annotations

import numpy as np

DECAY = 0.99  # per step: the averages weigh roughly the last 100 steps, the anomaly window's length


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
