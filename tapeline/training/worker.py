"""A non-chief worker of multi-worker training: `tapeline worker --storage ROOT --run-name RUN`.

Run one per non-chief task of the cluster, with its own `TF_CONFIG`; the chief is
the flow run (`tapeline train --run-name RUN …` with the chief's `TF_CONFIG`). The
worker waits for the chief's `runs/RUN/cluster.json` in the storage root, joins
the cluster, and trains that job in step with the others; it writes nothing to
the run (see tapeline/training/cluster.py).
"""

from __future__ import annotations

from tapeline.config import RunConfig
from tapeline.errors import ConfigError
from tapeline.results import PreparedData, TrainedModel
from tapeline.storage.root import Storage
from tapeline.training.cluster import cluster_from_env, wait_for_job


def work(storage: str | None, run_name: str, wait_seconds: float) -> TrainedModel:
    """Wait for the chief's job of run `run_name`, join its cluster, train in step; raises TapelineError."""
    cluster = cluster_from_env()
    if cluster is None or cluster.chief:
        raise ConfigError("TF_CONFIG must name this process as a non-chief worker of a cluster of two or more")
    root = Storage(RunConfig(storage=storage, run_name=run_name).validated().storage)
    print(f"{cluster.task_type} {cluster.task_id}: waiting for run {run_name}'s job from the chief")
    job = wait_for_job(root, run_name, wait_seconds)

    from tapeline.training.loop import (
        train_model,  # TensorFlow: only once the job is there
    )

    return train_model(RunConfig(**job["config"]), PreparedData.from_json(job["data"]), job["run_id"], job["warm_start"], curation=job.get("curation"))
