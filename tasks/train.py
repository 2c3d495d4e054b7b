"""Stage 3, train: the compiled GradientTape loop on the device the `gpu` tag routes it to."""

from __future__ import annotations

from prefect import task

from tapeline.config import RunConfig
from tapeline.results import PreparedData, TrainedModel
from tapeline.tasks.progress import TrainingProgress
from tapeline.training.loop import train_model


@task(name="train", tags=["gpu"])
def train(config: RunConfig, data: PreparedData, run_id: str, warm_start: dict | None, curation: dict | None = None) -> TrainedModel:
    """Train the CNN with a compiled GradientTape step; save the model, checkpoints and gradient snapshots under the run."""
    progress = TrainingProgress(run_id, config.batch_size, config.epochs)
    try:
        return train_model(config, data, run_id, warm_start, on_progress=progress, curation=curation)
    finally:
        progress.close()
