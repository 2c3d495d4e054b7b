"""Stage 6, promote: champion and challenger, and the Prefect artifacts that show the decision and the registry."""

from __future__ import annotations

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.logging import get_run_logger

from tapeline.registry.listing import model_registry, registry_table
from tapeline.registry.promotion import promote_if_better
from tapeline.results import DatasetFiles, Promotion
from tapeline.storage.root import Storage


@task(name="promote")
def promote(storage: str, run_id: str, files: DatasetFiles, model_uri: str, test_accuracy: float, margin: float) -> Promotion:
    """Make this run's model the current one if it beats the champion on the same test set; report the decision."""
    decision = promote_if_better(Storage(storage), run_id, files.dataset, files.test_set, model_uri, test_accuracy, margin, train_set=files.train_set)
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
    """The `model-registry` artifact of the current flow run: call it after this run's run.json is written, so it is listed.
    A run.json that cannot be read is left out, with a warning in the flow run's log."""
    rows = model_registry(Storage(storage), skipped=get_run_logger().warning)
    create_table_artifact(
        key="model-registry",
        table=registry_table(rows),
        description="tapeline model versions, newest first; the champion is the current model (`tapeline models` adds the data digests)",
    )
