"""Evaluation of a saved model on a split: what the model file itself predicts."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from prefect import task

from tasks.config import RunConfig
from tasks.preprocess import PreparedData, read_split
from tasks.storage import Storage
from tasks.train import TrainedModel

BATCH_SIZE = 1024


def evaluate_model(model_path: Path, split_uri: str) -> dict:
    """Accuracy and mean loss of the `.keras` file at `model_path` on a Parquet split.

    Loads with safe mode on: a model file is data, and must not run code.
    """
    model = keras.models.load_model(model_path, safe_mode=True)
    images, labels, _ = read_split(split_uri)
    logits = model.predict(images, batch_size=BATCH_SIZE, verbose=0)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    return {"accuracy": float(np.mean(np.argmax(logits, axis=1) == labels)), "loss": float(loss), "samples": len(labels)}


@task(name="evaluate")
def evaluate(config: RunConfig, trained: TrainedModel, data: PreparedData) -> dict:
    """Score the saved model on the test split."""
    return evaluate_model(Storage(config.storage).local(trained.model_uri), data.uris["test"])
