"""What a user watching training sees: a terminal progress bar and a Prefect progress artifact.

The artifact (key `training-progress`) is a bar and a one-line description: the step
and epoch, the loss, the speed and the time left while training; the totals when done.
"""

from __future__ import annotations

import math
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)

ARTIFACT_SECONDS = 2.0  # the Prefect API is told at most this often


class TrainingProgress:
    """Called after every step; cheap between updates (the step loop is the hot path)."""

    def __init__(self, run_id: str, batch_size: int, epochs: int):
        self.run_id, self.batch_size, self.epochs = run_id, batch_size, epochs
        self._bar = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[speed]:,.0f} samples/s"), TimeRemainingColumn(),
        )  # fmt: skip
        self._task = None
        self._artifact = create_progress_artifact(0.0, key="training-progress", description=f"Starting (run `{run_id}`)")
        self._started = self._reported_at = time.monotonic()
        self._speed_from: tuple[float, int] | None = None  # (when, step) of the first step seen: compiling is behind it
        self._seen: tuple[int, int] | None = None  # (step, last step) of the latest call

    def __call__(self, step: int, last_step: int, loss: float) -> None:
        now = time.monotonic()
        if self._task is None:
            self._bar.start()
            self._task = self._bar.add_task("train", total=last_step, completed=step, loss=loss, speed=0.0)
            self._speed_from = (now, step)
        self._bar.update(self._task, completed=step, loss=loss, speed=self._speed(now, step))
        self._seen = (step, last_step)
        if now - self._reported_at >= ARTIFACT_SECONDS or step == last_step:
            update_progress_artifact(self._artifact, 100.0 * step / last_step, description=self.describe(now, step, last_step, loss))
            self._reported_at = now

    def describe(self, now: float, step: int, last_step: int, loss: float) -> str:
        """The artifact's line: where training is, how fast it goes, how long it has left (or took); the run last, as
        the flow run's page already names it and its card shows only the line's start."""
        epoch = min(self.epochs, math.ceil(step * self.epochs / last_step))
        speed = self._speed(now, step)
        rate = f"{speed:,.0f} samples/s on average since its first step" if speed else "measuring speed"
        if step == last_step:
            return (f"Done: {last_step:,} steps ({self.epochs} epochs) in {_duration(now - self._started)}, {rate}; "
                    f"last loss {loss:.4f} (run `{self.run_id}`)")  # fmt: skip
        left = f", about {_duration((last_step - step) * self.batch_size / speed)} left" if speed else ""
        return f"Step {step:,} of {last_step:,}, epoch {epoch} of {self.epochs}, loss {loss:.4f}, {rate}{left} (run `{self.run_id}`)"

    def close(self) -> None:
        """Stop the bar; a run that stopped before its last step says so in the artifact, not "about … left"."""
        self._bar.stop()
        if self._seen is not None and self._seen[0] != self._seen[1]:
            step, last_step = self._seen
            update_progress_artifact(self._artifact, 100.0 * step / last_step,
                                     description=f"Stopped after step {step:,} of {last_step:,} (run `{self.run_id}`)")  # fmt: skip

    def _speed(self, now: float, step: int) -> float:
        started, first = self._speed_from
        return (step - first) * self.batch_size / (now - started) if now > started and step > first else 0.0


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"
