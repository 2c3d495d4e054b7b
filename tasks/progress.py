"""What a user watching training sees: a terminal progress bar and a Prefect progress artifact."""

from __future__ import annotations

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

    def __init__(self, run_id: str, batch_size: int):
        self.batch_size = batch_size
        self._bar = Progress(
            TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[speed]:,.0f} samples/s"), TimeRemainingColumn(),
        )  # fmt: skip
        self._task = None
        self._artifact = create_progress_artifact(0.0, description=f"Training run `{run_id}`")
        self._reported_at = time.monotonic()
        self._speed_from: tuple[float, int] | None = None

    def __call__(self, step: int, last_step: int, loss: float) -> None:
        now = time.monotonic()
        if self._task is None:
            self._bar.start()
            self._task = self._bar.add_task("train", total=last_step, completed=step, loss=loss, speed=0.0)
            self._speed_from = (now, step)
        started, first = self._speed_from
        speed = (step - first) * self.batch_size / (now - started) if now > started else 0.0
        self._bar.update(self._task, completed=step, loss=loss, speed=speed)
        if now - self._reported_at >= ARTIFACT_SECONDS or step == last_step:
            update_progress_artifact(self._artifact, 100.0 * step / last_step)
            self._reported_at = now

    def close(self) -> None:
        self._bar.stop()
