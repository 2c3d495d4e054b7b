"""The model registry: every finished run of a storage root, its data, parameters and score, the champion marked.

Only runs that still exist are listed: gc deletes a run's run.json first (tapeline/registry/retention.py)."""

from __future__ import annotations

from tapeline.registry.champion import current_champion
from tapeline.storage.root import Storage


def model_registry(storage: Storage) -> list[dict]:
    """Every run with a manifest, newest first: dataset digests, parameters, metrics, whether it is the champion."""
    champion = current_champion(storage) or {}
    rows = []
    for run_id in reversed(storage.listdir(storage.layout.runs)):
        if not storage.exists(manifest_path := storage.layout.run(run_id).run_json):
            continue  # running, or failed
        try:
            run = storage.read_json(manifest_path)
        except FileNotFoundError:  # a gc deleted the run since it was listed: run.json goes first
            continue
        rows.append(
            {  # what tells versions apart first: Prefect's table shows the leading columns without scrolling
                "run_id": run["run_id"],
                "current": run["run_id"] == champion.get("run_id"),
                "test_accuracy": run["metrics"]["test_accuracy"],
                "dataset": run["dataset"]["name"],
                "train_images_sha256": run["dataset"]["sha256"]["train_images"][:12],
                "epochs": run["parameters"]["epochs"],
                "learning_rate": run["parameters"]["learning_rate"],
                "batch_size": run["parameters"]["batch_size"],
                "promoted": run.get("promotion", {}).get("promoted"),
                "finished": run.get("finished"),
                "checkpoints": "kept" if storage.exists(storage.layout.run(run_id).checkpoint_index) else "dropped",
            }
        )
    return rows



def registry_lines(rows: list[dict]) -> list[str]:
    """The registry for a terminal, one run a line; * marks the champion."""
    return [
        f"{'*' if row['current'] else ' '} {row['run_id']:<28} {row['dataset']:<14} {row['train_images_sha256']}  "
        f"epochs {row['epochs']:<3} lr {row['learning_rate']:<8g} test accuracy {row['test_accuracy']:.4f}"
        + ("  checkpoints dropped" if row["checkpoints"] == "dropped" else "")
        for row in rows
    ]
