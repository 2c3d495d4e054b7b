"""Stage 5, evaluate: what the saved model file itself predicts on the test split."""

from __future__ import annotations

from prefect import task

from tapeline.evaluation import evaluate_model
from tapeline.storage.root import Storage


@task(name="evaluate")
def evaluate(storage: str, model_uri: str, test_uri: str, model_spec: str) -> dict:
    """Score the saved model (a model of `model_spec`) on the test split: accuracy, loss, samples."""
    return evaluate_model(Storage(storage).local(model_uri), test_uri, model_spec)
