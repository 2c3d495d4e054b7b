"""Evaluation of a saved model on a split: what the model file itself predicts."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from tapeline.data.splits import read_split
from tapeline.model import mean_loss

BATCH_SIZE = 1024


def evaluate_model(model_path: Path, split_uri: str) -> dict:
    """Accuracy and mean loss of the `.keras` file at `model_path` on a Parquet split.

    Loads with safe mode on: a model file is data, and must not run code.
    """
    model = keras.models.load_model(model_path, safe_mode=True)
    images, labels, _ = read_split(split_uri)
    logits = model.predict(images, batch_size=BATCH_SIZE, verbose=0)
    loss = mean_loss(labels, logits)
    return {"accuracy": float(np.mean(np.argmax(logits, axis=1) == labels)), "loss": float(loss), "samples": len(labels)}


def predict_classes(model_path: Path, images: np.ndarray) -> np.ndarray:
    """The class index the `.keras` file at `model_path` predicts for each of `images` (raw uint8 pixels)."""
    model = keras.models.load_model(model_path, safe_mode=True)
    return np.argmax(model.predict(images, batch_size=BATCH_SIZE, verbose=0), axis=1)
