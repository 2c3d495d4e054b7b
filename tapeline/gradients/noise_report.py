"""The gradient noise scale report: a run's estimates per step read back, the number run.json records, and their plot.

`noise_history` reads the `steps` dataset's estimates and smooths them as training
did (tapeline/gradients/noise.py); `render_noise_scale` draws, from plain arrays, the
three statistics a user meets (the raw B_simple per step, the smoothed one, and the
median of the smoothed one over the last epoch, which run.json records), each under
its name, with the batch size used; `write_noise_report` saves the PNG under the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePath

import numpy as np
import pyarrow.compute as pc

from tapeline import reader
from tapeline.errors import TapelineError
from tapeline.gradients.noise import DECAY, median_last_epoch, smoothed_noise_scale
from tapeline.gradients.plotting import DISTINCT, palette_png, pyplot, save_png
from tapeline.storage.root import Storage

RAW, SMOOTHED, MEDIAN, BATCH = "#7aa6d6", "#0b4f9c", DISTINCT[2], "#d95f02"


class NoiseReportError(TapelineError):
    """The noise scale's columns do not fit together."""


@dataclass(frozen=True)
class NoiseHistory:
    """A run's noise estimates per step, in step order, and what is derived from them."""

    steps: np.ndarray
    epochs: np.ndarray
    raw: np.ndarray  # B_simple of each step as estimated (`grad_noise_scale`): ≤ 0 or NaN at many steps
    variance: np.ndarray  # tr Σ (`grad_variance`)
    signal: np.ndarray  # ‖𝒢‖² (`grad_signal`)
    smoothed: np.ndarray  # EMA(tr Σ) / EMA(‖𝒢‖²) at each step
    batch_size: int  # of the run's full batches
    decay: float = DECAY

    @classmethod
    def of(cls, steps, epochs, raw, variance, signal, batch_size: int, decay: float = DECAY) -> NoiseHistory:
        """From the estimates per step; smoothed here, as training smoothed them for TensorBoard."""
        columns = [np.asarray(column) for column in (steps, epochs, raw, variance, signal)]
        if len({len(column) for column in columns}) != 1 or not len(columns[0]):
            raise NoiseReportError(f"noise scale: {len(columns[0])} steps need as many epochs and estimates, got {[len(c) for c in columns[1:]]}")
        smoothed = smoothed_noise_scale(columns[3], columns[4], decay)
        return cls(*columns[:2], columns[2].astype(np.float64), *columns[3:], smoothed, batch_size, decay)

    @property
    def median_last_epoch(self) -> float | None:
        """run.json's `noise_scale_smoothed_median_last_epoch` (noise.median_last_epoch)."""
        return median_last_epoch(self.epochs, self.smoothed)

    @property
    def smoothed_last_step(self) -> float:
        """Where TensorBoard's `step/noise_scale_smoothed` ends (NaN if the signal's average never came out positive)."""
        return float(self.smoothed[-1])

    @property
    def raw_not_positive(self) -> int:
        """Steps whose own B_simple is ≤ 0 or NaN: the estimates of tr Σ and ‖𝒢‖² are differences, either can dip below 0."""
        return int(np.count_nonzero(~(np.isfinite(self.raw) & (self.raw > 0))))


def noise_history(run: str | Path) -> NoiseHistory:
    """The run's estimates per step from its `steps` dataset; `batch_size`: its longest batch (a last one can be shorter)."""
    columns = ["step", "epoch", "grad_noise_scale", "grad_variance", "grad_signal"]
    table = reader.read_steps(run, columns=[*columns, "sample_ids"]).sort_by("step")
    if not pc.any(pc.is_finite(table.column("grad_variance"))).as_py():
        raise reader.NoGradientsError(f"{run} has no gradient noise estimates (a run trained with --no-per-example-norms has none)")
    batch_size = int(pc.max(pc.list_value_length(table.column("sample_ids"))).as_py())
    return NoiseHistory.of(*(table.column(name).to_numpy(zero_copy_only=False) for name in columns), batch_size)


def noise_scale_median_last_epoch(run: str | Path) -> float | None:
    """run.json's `noise_scale_smoothed_median_last_epoch` of a run; None without estimates (per-example norms off, no steps)."""
    try:
        return noise_history(run).median_last_epoch
    except reader.NoGradientsError:  # stopped before its first step was logged
        return None


def render_noise_scale(history: NoiseHistory, title: str = "") -> bytes:
    """B_simple per step, raw (faint) and smoothed, on a log axis; the last epoch's median of the smoothed value as a
    segment over that epoch; the batch size used as a horizontal line. The key sits below the plot, off the data.

    Raw values that are not positive or not finite cannot sit on a log axis: they are left out, and the key says how many."""
    steps, raw, smoothed = history.steps, history.raw, history.smoothed
    shown = np.isfinite(raw) & (raw > 0)
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(7.5, 4.2), dpi=90, layout="constrained")
    axes.plot(steps[shown], raw[shown], ".", markersize=1.5, color=RAW, alpha=0.5,
              label=f"raw: each step's own ({history.raw_not_positive:,} of {len(raw):,} steps ≤ 0 or NaN: not shown)")  # fmt: skip
    last = f"{history.smoothed_last_step:.4g}" if np.isfinite(history.smoothed_last_step) else "none"
    axes.plot(steps, smoothed, color=SMOOTHED, linewidth=1.6,
              label=f"smoothed: EMA(tr Σ) / EMA(|G|²), decay {history.decay:g} ({last} at the last step)")  # fmt: skip
    median = history.median_last_epoch
    if median is not None:
        epoch = history.epochs.max()
        span = steps[history.epochs == epoch]
        axes.hlines(median, span[0], span[-1], color=MEDIAN, linewidth=3,
                    label=f"median of the smoothed value over the last epoch (epoch {epoch}): {median:.4g}")  # fmt: skip
    axes.axhline(history.batch_size, color=BATCH, linestyle="--", linewidth=1.2, label=f"batch size used: {history.batch_size}")
    if shown.any() or np.isfinite(smoothed).any():
        axes.set_yscale("log")
    if len(steps) > 1:
        axes.set_xlim(steps[0], steps[-1])  # the steps', even when no value is shown
    axes.set(xlabel="step", ylabel="B_simple (examples)", title=title or "Gradient noise scale B_simple = tr Σ / |G|²")
    axes.title.set_fontsize(9)
    axes.grid(True, which="major", linewidth=0.4, alpha=0.5)
    figure.legend(loc="outside lower center", fontsize=7, frameon=False)
    return palette_png(figure)


@dataclass(frozen=True)
class NoiseReport:
    path: PurePath  # the PNG, under the run
    png: bytes
    history: NoiseHistory


def write_noise_report(storage: Storage, run_id: str) -> NoiseReport:
    """Render the noise scale plot of a run whose steps are logged, save it under the run, say where."""
    run = storage.layout.run(run_id)
    history = noise_history(storage.uri_of(run.directory))
    png = render_noise_scale(history, title=f"Gradient noise scale B_simple = tr Σ / |G|², run {run_id}")
    save_png(storage, run.noise_plot, png)
    return NoiseReport(run.noise_plot, png, history)
