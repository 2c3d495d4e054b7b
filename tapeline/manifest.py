"""The run manifest, `<storage>/runs/<run_id>/run.json`: what one run did, and where it put it.

Its fields: docs/data-format.md#runjson. Written last, it makes the run complete, and a
complete run is history: nothing writes under it again (`completed_run`).
"""

from __future__ import annotations

import dataclasses

from tapeline.config import RunConfig, run_identity
from tapeline.data.splits import samples_used
from tapeline.errors import ConfigError
from tapeline.gradients.noise import NOISE_SCALE_METRIC
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
    curation: dict | None = None,
    label_issues: dict | None = None,
) -> dict:
    storage = Storage(config.storage)
    run = storage.layout.run(run_id)
    model_card = write_model_card(storage, run_id, files, data, trained, scores)
    manifest = {
        "run_id": run_id,
        "status": "completed",
        "started": started,
        "finished": utc_now(),
        "parameters": config.parameters(),
        "dataset": {
            "name": files.dataset,
            "sha256": files.sha256,
            "classes": list(data.shape.classes),
            "image_shape": list(data.shape.image_shape),
            "test_split": files.test_split,
            "preprocessed": data.directory,
            "train_samples": samples_used(data.counts["train"], config.train_limit) - (curation or {}).get("count", 0),
        },
        "model": trained.model,
        "curation": curation,
        "label_issues": None if label_issues is None else {k: v for k, v in label_issues.items() if k != "uri"},
        "device": trained.device,
        "warm_start": trained.warm_start,
        "stages": stages,
        "metrics": {
            "epochs": trained.epochs,
            **final_metrics(scores, exported),
            "suggested_batch_size": suggested_batch_size(exported.noise_scale_smoothed_median_last_epoch),
            "batch_size": config.batch_size,
        },
        "promotion": dataclasses.asdict(promotion),
        "uris": {
            "model": trained.model_uri,
            "model_card": model_card,
            "gradients": exported.uri,
            "steps": trained.steps_uri,
            "stats": storage.uri_of(run.stats),
            "samples": storage.uri_of(run.samples) if trained.model["per_example"]["norms"] else None,
            "label_issues": label_issues["uri"] if label_issues else None,
            "tensorboard": trained.tensorboard_uri,
            **data.uris,
        },
    }
    storage.write_json(run.run_json, manifest)
    return manifest


def final_metrics(scores: dict, exported: GradientExport) -> dict[str, float | None]:
    """What a finished run is compared by, under the names run.json's `metrics` and TensorBoard's `metrics/` tags give
    them: the test accuracy and loss, and the gradient noise scale named for its statistic (NOISE_SCALE_METRIC: the
    median over the last epoch of the smoothed B_simple; None without per-example norms)."""
    return {"test_accuracy": scores["accuracy"], "test_loss": scores["loss"], NOISE_SCALE_METRIC: exported.noise_scale_smoothed_median_last_epoch}


def suggested_batch_size(noise_scale: float | None) -> int | None:
    """The noise scale, rounded: B_simple estimates the critical batch size (McCandlish et al. 2018), below which a
    larger batch trains in proportionally fewer steps, and above which the gain fades."""
    return max(1, round(noise_scale)) if noise_scale is not None and noise_scale > 0 else None


def run_manifest_uri(storage: str, run_id: str) -> str:
    storage = Storage(storage)
    return storage.uri_of(storage.layout.run(run_id).run_json)


def completed_run(config: RunConfig, run_id: str) -> dict | None:
    """The manifest of `run_id` if it is complete, None if not; ConfigError if it is complete with other
    parameters (`run_identity`'s): a completed run is never written again, whatever the call asks of it."""
    storage = Storage(config.storage)
    path = storage.layout.run(run_id).run_json
    if not storage.exists(path):
        return None
    manifest = storage.read_json(path)
    recorded, asked = run_identity(manifest["parameters"]), run_identity(config.parameters())
    differing = [name for name in asked if asked[name] != recorded[name]]
    if differing:
        raise ConfigError(
            f"run {run_id!r} is complete with {_values(recorded, differing)}; this call has {_values(asked, differing)}: choose another --run-name"
        )
    return manifest


def _values(parameters: dict, names: list[str]) -> str:
    return ", ".join(f"{name}={parameters[name]!r}" for name in names)
