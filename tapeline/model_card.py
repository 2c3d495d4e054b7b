"""The model card, `<storage>/runs/<run_id>/model.json`: how to use `model.keras`, beside it.

The model takes raw uint8 pixels and rescales them itself, and returns logits. A
user who divides by 255 first, as most MNIST code does, silently gets chance-level
predictions; the card says so, with the class names in output order, the dataset
it was trained on and its test accuracy. Written once test accuracy is known.

Its fields: docs/data-format.md#modeljson-the-model-card.
"""

from __future__ import annotations

from tapeline.data.splits import IMAGE_SHAPE, NUM_CLASSES
from tapeline.model import INPUT_DTYPE
from tapeline.results import DatasetFiles, TrainedModel
from tapeline.storage.root import Storage


def model_card(run_id: str, files: DatasetFiles, trained: TrainedModel, scores: dict) -> dict:
    return {
        "run_id": run_id,
        "model": trained.model_uri,
        "input": {
            "shape": [None, *IMAGE_SHAPE],
            "dtype": INPUT_DTYPE,
            "range": [0, 255],
            "rescale": False,
            "note": "raw pixels, as the IDX files and the Parquet splits hold them: the model's first layer "
            "rescales them; dividing by 255 first gives chance-level predictions",
        },
        "output": {
            "shape": [None, NUM_CLASSES],
            "values": "logits",
            "note": "argmax is the class; keras.ops.softmax(logits) gives probabilities",
        },
        "classes": list(files.classes),
        "dataset": {"name": files.dataset, "sha256": files.sha256},
        "metrics": {"test_accuracy": scores["accuracy"], "test_loss": scores["loss"], "test_samples": scores["samples"]},
    }


def write_model_card(storage: Storage, run_id: str, files: DatasetFiles, trained: TrainedModel, scores: dict) -> str:
    """Write the card beside the model; its URI."""
    path = storage.layout.run(run_id).model_card
    storage.write_json(path, model_card(run_id, files, trained, scores))
    return storage.uri_of(path)
