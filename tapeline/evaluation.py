"""Evaluation of a saved model on a split: what the model file itself predicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tapeline.config import DEFAULT_MODEL
from tapeline.data.splits import read_split
from tapeline.model import ModelSpec, mean_loss

BATCH_SIZE = 1024


def evaluate_model(model_path: Path, split_uri: str, spec: str = DEFAULT_MODEL) -> dict:
    """Accuracy and mean loss of the `.keras` file at `model_path`, a model of `spec`, on a Parquet split."""
    model = ModelSpec(spec).load(model_path)
    images, labels, _ = read_split(split_uri)
    logits = model.predict(images, batch_size=BATCH_SIZE, verbose=0)
    loss = mean_loss(labels, logits)
    return {"accuracy": float(np.mean(np.argmax(logits, axis=1) == labels)), "loss": float(loss), "samples": len(labels)}
