"""The model card, `<storage>/runs/<run_id>/model.json`: how to use `model.keras`, beside it.

The model takes raw uint8 pixels, as the data holds them, and returns logits. A user
who divides by 255 first, as most image code does, silently gets other predictions;
the card says so, with the input's shape and the class names in output order (both
from the data), what to import before loading a model of one's own classes, the
dataset it was trained on and its test accuracy. Written once test accuracy is known.

Its fields: docs/data-format.md#modeljson-the-model-card.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from tapeline.model import INPUT_DTYPE, ModelSpec
from tapeline.results import DatasetFiles, PreparedData, TrainedModel
from tapeline.storage.root import Storage


def model_card(run_id: str, files: DatasetFiles, data: PreparedData, trained: TrainedModel, scores: dict) -> dict:
    """The card: the input and output as the data and the model have them, what to import before loading, the scores."""
    return {
        "run_id": run_id,
        "model": trained.model_uri,
        "spec": trained.model["spec"],
        "load": _loading(trained.model["spec"]),
        "input": {
            "shape": [None, *data.shape.image_shape],
            "dtype": INPUT_DTYPE,
            "range": [0, 255],
            "rescale": False,
            "note": "raw pixels, as the Parquet splits hold them: the model takes them as they are; scaling them "
            "first (dividing by 255, as most image code does) gives other, usually chance-level, predictions",
        },
        "output": {
            "shape": [None, data.shape.num_classes],
            "values": "logits",
            "note": "argmax is the class; keras.ops.softmax(logits) gives probabilities",
        },
        "classes": list(data.shape.classes),
        "dataset": {"name": files.dataset, "sha256": files.sha256},
        "metrics": {"test_accuracy": scores["accuracy"], "test_loss": scores["loss"], "test_samples": scores["samples"]},
    }


def _loading(spec: str) -> dict:
    """How a fresh process loads model.keras with plain Keras: the module to import first when the model has classes
    of its own (importing it registers them), and the code."""
    module = ModelSpec(spec).imports()
    load = "keras.models.load_model('model.keras')"
    if module is None:
        return {"import": None, "code": f"import keras; {load}"}
    if module.endswith(".py"):
        path = PurePosixPath(module)
        return {"import": module, "code": f"import sys; sys.path.insert(0, '{path.parent}'); import {path.stem}; import keras; {load}"}
    return {"import": module, "code": f"import {module}; import keras; {load}"}


def write_model_card(storage: Storage, run_id: str, files: DatasetFiles, data: PreparedData, trained: TrainedModel, scores: dict) -> str:
    """Write the card beside the model; its URI."""
    path = storage.layout.run(run_id).model_card
    storage.write_json(path, model_card(run_id, files, data, trained, scores))
    return storage.uri_of(path)
