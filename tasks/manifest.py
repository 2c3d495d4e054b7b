"""The run manifest, `<storage>/runs/<run_id>/run.json`: what one run did, and where it put it.

    run_id, status, started, finished
    parameters   every flow parameter, by name
    dataset      name, and the SHA-256 of each IDX file
    device       the TensorFlow device training ran on
    warm_start   the champion pointer training started from (--warm-start), or null
    stages       per task name: seconds, and whether it was served from cache
    metrics      epochs: [{epoch, train_loss, train_accuracy, val_loss, val_accuracy,
                 seconds, train_samples_per_second}], test_accuracy, test_loss
    promotion    promoted, reason, margin, challenger, champion (see tasks/promote.py)
    uris         everything the run wrote that a user reads: model, model_card (model.json),
                 gradients, steps, stats (Parquet dataset directories), tensorboard (its log
                 directory), and the preprocessed train, validation, test split files
"""

from __future__ import annotations

import dataclasses
import secrets
import time

from prefect import get_client
from prefect.context import FlowRunContext

from tasks.config import RunConfig
from tasks.download import DatasetFiles
from tasks.export import GradientExport
from tasks.model_card import write_model_card
from tasks.preprocess import PreparedData
from tasks.promote import Promotion
from tasks.storage import Storage, utc_now
from tasks.train import TrainedModel


def choose_run_id(run_name: str | None) -> str:
    """The run's id: its run_name, else `new_run_id()`."""
    return run_name or new_run_id()


def flow_run_name() -> str:
    """train-flow's `flow_run_name`: the run id, so Prefect's run list and `<storage>/runs/` line up.

    Prefect calls it in the flow run's context before the flow body runs, and again
    on a retry, which keeps the flow run's creation time, id and parameters: both
    calls, and the body's, give the same id.
    """
    return choose_run_id(FlowRunContext.get().parameters.get("run_name"))


def tag_flow_run(*tags: str) -> None:
    """Add tags to the current flow run, keeping those it has (Prefect's `tags` context only tags runs created inside it)."""
    flow_run = FlowRunContext.get().flow_run
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, tags=list(dict.fromkeys([*flow_run.tags, *tags])))


def new_run_id() -> str:
    """The id of a run given no run_name: its flow run's creation time and id.

    A retried flow run (`prefect flow-run retry`) keeps both, so its training
    finds the checkpoints of the attempt that died and resumes from them.
    """
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:  # called outside a flow run
        return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)
    return f"{context.flow_run.created:%Y%m%d-%H%M%S}-{context.flow_run.id.hex[:6]}"


class StageClock:
    """Runs the pipeline's stages in order and keeps, per stage, its seconds and cache status.

    `before_each` runs before every stage (the run lease's check: a process that lost it stops there).
    """

    def __init__(self, before_each=lambda: None):
        self.record: dict[str, dict] = {}
        self._before_each = before_each

    def run(self, stage, *args):
        self._before_each()
        started = time.perf_counter()
        result = stage(*args)
        self.record[stage.name] = {
            "seconds": round(time.perf_counter() - started, 3),
            "cached": bool(getattr(result, "cached", False)),
        }
        return result


def write_run_manifest(
    config: RunConfig,
    run_id: str,
    started: str,
    files: DatasetFiles,
    data: PreparedData,
    trained: TrainedModel,
    exported: GradientExport,
    scores: dict,
    promotion: Promotion,
    stages: dict,
) -> dict:
    storage = Storage(config.storage)
    model_card = write_model_card(storage, run_id, files, trained, scores)
    manifest = {
        "run_id": run_id,
        "status": "completed",
        "started": started,
        "finished": utc_now(),
        "parameters": config.parameters(),
        "dataset": {"name": files.dataset, "sha256": files.sha256, "preprocessed": data.directory},
        "device": trained.device,
        "warm_start": trained.warm_start,
        "stages": stages,
        "metrics": {"epochs": trained.epochs, "test_accuracy": scores["accuracy"], "test_loss": scores["loss"]},
        "promotion": dataclasses.asdict(promotion),
        "uris": {
            "model": trained.model_uri,
            "model_card": model_card,
            "gradients": exported.uri,
            "steps": trained.steps_uri,
            "stats": storage.uri_of(storage.run_dir(run_id) / "stats"),
            "tensorboard": trained.tensorboard_uri,
            **data.uris,
        },
    }
    storage.write_json(storage.run_dir(run_id) / "run.json", manifest)
    return manifest


def run_manifest_uri(storage: str, run_id: str) -> str:
    storage = Storage(storage)
    return storage.uri_of(storage.run_dir(run_id) / "run.json")
