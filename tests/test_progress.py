"""The training-progress artifact, through a real Prefect API: what it says while training, when done, when stopped."""

import re
import time

import pytest
from prefect import flow, get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

from tapeline.tasks.progress import TrainingProgress

pytestmark = pytest.mark.usefixtures("prefect_api")


def progress_artifact(flow_run_id):
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["training-progress"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return artifact


@flow(name="progress-artifact")
def train_like(run_id: str, steps: int, last_step: int, epochs: int) -> str:
    """The train task's calls: one per step, then `close`; returns what the progress would say halfway through."""
    progress = TrainingProgress(run_id, batch_size=32, epochs=epochs)
    try:
        for step in range(1, steps + 1):
            progress(step, last_step, 1.0 / step)
        return progress.describe(time.monotonic(), last_step // 2 + 1, last_step, 0.25)
    finally:
        progress.close()


def test_while_training_it_says_the_step_epoch_loss_speed_and_time_left():
    line = train_like("r", steps=3, last_step=10, epochs=2)
    assert re.fullmatch(
        r"Step 6 of 10, epoch 2 of 2, loss 0\.2500, [\d,]+ samples/s on average since its first step, "
        r"about \d+ (min \d+ )?s left \(run `r`\)",
        line,
    ), line


def test_when_done_it_says_the_totals():
    state = train_like("done", steps=10, last_step=10, epochs=2, return_state=True)
    artifact = progress_artifact(state.state_details.flow_run_id)
    assert float(artifact.data) == 100.0
    assert re.fullmatch(
        r"Done: 10 steps \(2 epochs\) in \d+ s, [\d,]+ samples/s on average since its first step; "
        r"last loss 0\.1000 \(run `done`\)",
        artifact.description,
    ), artifact.description


def test_a_run_that_stops_early_says_where():
    state = train_like("stopped", steps=4, last_step=10, epochs=2, return_state=True)
    artifact = progress_artifact(state.state_details.flow_run_id)
    assert float(artifact.data) == 40.0
    assert artifact.description == "Stopped after step 4 of 10 (run `stopped`)"
