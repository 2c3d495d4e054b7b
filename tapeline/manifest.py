"""The run manifest, `<storage>/runs/<run_id>/run.json`: what one run did, and where it put it.

Its fields: docs/data-format.md#runjson.
"""

from __future__ import annotations

import dataclasses

from tapeline.config import RunConfig
from tapeline.model_card import write_model_card
from tapeline.results import (
    DatasetFiles,
    GradientExport,
    PreparedData,
    Promotion,
    TrainedModel,
)
from tapeline.storage.root import Storage, utc_now


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
    run = storage.layout.run(run_id)
    model_card = write_model_card(storage, run_id, files, trained, scores)
    manifest = {
        "run_id": run_id,
        "status": "completed",
        "started": started,
        "finished": utc_now(),
        "parameters": config.parameters(),
        "dataset": {"name": files.dataset, "sha256": files.sha256, "classes": list(files.classes), "preprocessed": data.directory},
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
            "stats": storage.uri_of(run.stats),
            "tensorboard": trained.tensorboard_uri,
            **data.uris,
        },
    }
    storage.write_json(run.run_json, manifest)
    return manifest


def run_manifest_uri(storage: str, run_id: str) -> str:
    storage = Storage(storage)
    return storage.uri_of(storage.layout.run(run_id).run_json)
