"""Champion and challenger: a run's model becomes the current one only if it is better.

A challenger replaces the champion (`<storage>/models/current`, see
tasks/champion.py) when its test accuracy is at least the champion's plus
`promotion_margin`; the decision is made against the pointer as it is when the
new one is written (compare-and-swap), so two runs finishing at once cannot both
win against the same champion. A champion trained on another dataset is no
yardstick: the challenger replaces it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.champion import ChampionPointer, current_champion
from tasks.config import DEFAULT_STORAGE, STORAGE_ENV, RunConfig
from tasks.storage import Storage, utc_now
from tasks.train import TrainedModel


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    reason: str
    margin: float
    challenger: dict  # run_id, test_accuracy
    champion: dict | None  # the champion it was measured against


def promote_if_better(storage: Storage, run_id: str, dataset: str, model_uri: str, test_accuracy: float, margin: float) -> Promotion:
    challenger = {"run_id": run_id, "dataset": dataset, "model": model_uri, "test_accuracy": test_accuracy}
    pointer = ChampionPointer(storage)
    while True:  # until the decision is made against the pointer as it still is
        champion, version = pointer.read()
        if champion is None:
            promoted, reason = True, "no champion yet"
        elif champion["dataset"] != dataset:
            promoted, reason = True, f"the champion was trained on {champion['dataset']}"
        else:
            promoted = test_accuracy >= champion["test_accuracy"] + margin
            reason = (
                f"test accuracy {test_accuracy:.4f} {'>=' if promoted else '<'} "
                f"champion {champion['test_accuracy']:.4f} + margin {margin:g}"
            )
        if not promoted or pointer.swap({**challenger, "promoted": utc_now()}, version):
            return Promotion(promoted=promoted, reason=reason, margin=margin, challenger=challenger, champion=champion)


def model_registry(storage: Storage) -> list[dict]:
    """Every run with a manifest, newest first: dataset digests, parameters, metrics, whether it is the champion."""
    champion = current_champion(storage) or {}
    rows = []
    for run_id in reversed(storage.listdir(storage.root / "runs")):
        if not storage.exists(manifest_path := storage.run_dir(run_id) / "run.json"):
            continue  # running, or failed
        run = storage.read_json(manifest_path)
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
            }
        )
    return rows


@task(name="promote")
def promote(config: RunConfig, trained: TrainedModel, scores: dict) -> Promotion:
    """Make this run's model the current one if it beats the champion; report the decision."""
    storage = Storage(config.storage)
    decision = promote_if_better(
        storage, trained.run_id, config.dataset, trained.model_uri, scores["accuracy"], config.promotion_margin
    )
    create_markdown_artifact(key="promotion", markdown=promotion_markdown(decision), description="champion and challenger")
    print(f"{verdict(decision)}: {decision.reason}")
    return decision


def verdict(decision: Promotion) -> str:
    return "promoted" if decision.promoted else "not promoted"


def promotion_markdown(decision: Promotion) -> str:
    """The decision as a heading, its reason, and both models side by side."""
    rows = [("challenger", decision.challenger, verdict(decision), f"{decision.margin:g}")]
    if decision.champion is not None:
        rows.append(("champion", decision.champion, "replaced" if decision.promoted else "stays current", ""))
    lines = [
        f"## Run `{decision.challenger['run_id']}`: {verdict(decision)}",
        "",
        f"Reason: {decision.reason}.",
        "",
        "| | run | dataset | test accuracy | decision | margin |",
        "|---|---|---|---|---|---|",
        *(
            f"| {role} | `{model['run_id']}` | {model['dataset']} | {model['test_accuracy']:.4f} | {outcome} | {margin} |"
            for role, model, outcome, margin in rows
        ),
    ]
    return "\n".join(lines) + "\n"


def publish_model_registry(storage: str) -> None:
    """The `model-registry` artifact of the current flow run: call it after this run's run.json is written, so it is listed."""
    create_table_artifact(
        key="model-registry", table=model_registry(Storage(storage)), description="tapeline model versions; current: the champion"
    )


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.promote [storage]`: print the model registry."""
    parser = argparse.ArgumentParser(prog="python -m tasks.promote", description="List model versions; * marks the current one.")
    parser.add_argument("storage", nargs="?", default=os.environ.get(STORAGE_ENV, DEFAULT_STORAGE))
    storage = Storage(parser.parse_args(argv).storage)
    for row in model_registry(storage):
        print(
            f"{'*' if row['current'] else ' '} {row['run_id']:<28} {row['dataset']:<14} {row['train_images_sha256']}  "
            f"epochs {row['epochs']:<3} lr {row['learning_rate']:<8g} test accuracy {row['test_accuracy']:.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
