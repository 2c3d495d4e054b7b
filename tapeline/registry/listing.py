"""The model registry: every finished run of a storage root, its data, parameters and score, the champion marked.

Only runs that still exist are listed: gc deletes a run's run.json first (tapeline/registry/retention.py)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from tapeline.config import DEFAULT_MODEL
from tapeline.registry.champion import current_champion
from tapeline.storage.root import Storage


def model_registry(storage: Storage, skipped: Callable[[str], None] | None = None) -> list[dict]:
    """Every run with a manifest, newest first: dataset digests, parameters, metrics, whether it is the champion.

    A run.json that cannot be read (truncated, corrupt) is left out, and the others listed: `skipped` gets one
    line naming it (default: printed to stderr).
    """
    champion = current_champion(storage) or {}
    rows = []
    for run_id in reversed(storage.listdir(storage.layout.runs)):
        if not storage.exists(manifest_path := storage.layout.run(run_id).run_json):
            continue  # running, or failed
        try:
            rows.append(_registry_row(storage.read_json(manifest_path), champion) | {"checkpoints": _checkpoints(storage, run_id)})
        except FileNotFoundError:  # a gc deleted the run since it was listed: run.json goes first
            continue
        except (ValueError, KeyError, TypeError) as error:  # not JSON (ValueError), or not a whole run manifest
            line = f"skipped {storage.uri_of(manifest_path)}: not a readable run manifest ({type(error).__name__}: {error})"
            (skipped or _to_stderr)(line)
    rows.sort(key=lambda row: str(row["finished"] or ""), reverse=True)  # a run's name need not sort by time; ties keep it
    return rows


def _registry_row(run: dict, champion: dict) -> dict:
    return {  # what `tapeline models` prints and `registry_table` shows in Prefect are taken from these
        "run_id": run["run_id"],
        "current": run["run_id"] == champion.get("run_id"),
        "test_accuracy": run["metrics"]["test_accuracy"],
        "dataset": run["dataset"]["name"],
        "model": run["parameters"].get("model", DEFAULT_MODEL),  # a run.json without it trained the example's CNN
        "train_images_sha256": run["dataset"]["sha256"]["train_images"][:12],
        "epochs": run["parameters"]["epochs"],
        "learning_rate": run["parameters"]["learning_rate"],
        "batch_size": run["parameters"]["batch_size"],
        "promoted": run.get("promotion", {}).get("promoted"),
        "finished": run.get("finished"),
    }


def _checkpoints(storage: Storage, run_id: str) -> str:
    """Whether the run's checkpoints are "kept", or "dropped" once it completed (tapeline/registry/retention.py)."""
    return "kept" if storage.exists(storage.layout.run(run_id).checkpoint_index) else "dropped"


def _to_stderr(line: str) -> None:
    print(f"tapeline: {line}", file=sys.stderr)


def registry_table(rows: list[dict]) -> list[dict]:
    """The registry as a person compares versions, in a table narrow enough for Prefect's artifact page: the run
    (newest first), whether it is the champion, its score to 4 decimals, and the parameters runs differ in. The
    digests and times are run.json's and `tapeline models`'."""
    return [
        {
            "run": row["run_id"],
            "status": _status(row),
            "test accuracy": round(row["test_accuracy"], 4),
            "dataset": row["dataset"],
            "model": row["model"],
            "epochs": row["epochs"],
            "batch": row["batch_size"],
            "lr": row["learning_rate"],  # as `tapeline models` calls it
            "checkpoints": row["checkpoints"],
        }
        for row in rows
    ]


def _status(row: dict) -> str:
    if row["current"]:
        return "champion"
    return "was champion" if row["promoted"] else "not promoted"


def registry_lines(rows: list[dict]) -> list[str]:
    """The registry for a terminal, one run a line; * marks the champion."""
    return [
        f"{'*' if row['current'] else ' '} {row['run_id']:<28} {row['dataset']:<14} {row['train_images_sha256']}  "
        f"epochs {row['epochs']:<3} lr {row['learning_rate']:<8g} test accuracy {row['test_accuracy']:.4f}  model {row['model']}"
        + ("  checkpoints dropped" if row["checkpoints"] == "dropped" else "")
        for row in rows
    ]
