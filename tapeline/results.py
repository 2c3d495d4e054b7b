"""What each stage hands the next: small, picklable references to what it wrote, never arrays.

Kept apart from the modules that produce them, so that reading a result never imports TensorFlow.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tapeline.data.shape import DataShape


@dataclass(frozen=True)
class DatasetFiles:
    """The download stage's result: the dataset's files in the storage cache, and what they hold."""

    dataset: str
    paths: dict[str, str]  # storage URIs, keyed by SPLIT_FILES
    sha256: dict[str, str]  # content digests, keyed like paths (what each is a digest of: docs/your-data.md#digests)
    cached: bool  # every file was already in the cache
    shape: DataShape  # the images' shape and the class names in label order (the model's output order)
    encoding: str = "idx"  # of the cached files: "idx" (gzipped IDX) or "npy" (gzipped .npy arrays of decoded images)
    test_split: dict | None = None  # how the test split was carved out of one folder ({"seed", "fraction"}); None: the source has one

    @property
    def classes(self) -> tuple[str, ...]:
        return self.shape.classes

    @property
    def test_set(self) -> str:
        """The test split's identity: accuracies compare only on the same one."""
        return split_identity(self.sha256, "test")

    @property
    def train_set(self) -> str:
        """The training data's identity: a warm start takes only a champion trained on the same."""
        return split_identity(self.sha256, "train")


def split_identity(sha256: dict[str, str], split: str) -> str:
    """A split's identity (`train` or `test`), from its images' and labels' IDX digests (`DatasetFiles.sha256`,
    run.json's `dataset.sha256`): the first 16 hex digits of the SHA-256 of the two digests, images' first."""
    return hashlib.sha256((sha256[f"{split}_images"] + sha256[f"{split}_labels"]).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PreparedData:
    """The preprocess stage's result: where the splits are, and what they hold."""

    dataset: str
    directory: str
    uris: dict[str, str]  # split -> Parquet file
    counts: dict[str, int]
    cached: bool
    shape: DataShape  # the images' shape and the classes: what the model takes and returns

    @classmethod
    def from_json(cls, record: dict) -> PreparedData:
        """Back from `dataclasses.asdict` as JSON (a training job handed to another process)."""
        return cls(**(record | {"shape": DataShape(**record["shape"])}))


@dataclass(frozen=True)
class TrainedModel:
    """The train stage's result: where the model and the raw gradient files are, and how training went."""

    run_id: str
    device: str
    model_uri: str | None  # None when training stopped on a non-finite value
    gradients_uri: str
    steps_uri: str
    tensorboard_uri: str
    variables: list[str]
    model: dict  # run.json's `model`: spec, architecture digest, parameter count, trainable variables (tapeline/model.py)
    steps: int
    resumed_from: int  # the step of the checkpoint training resumed from; 0 for a fresh start
    warm_start: dict | None  # run.json's `warm_start`: the run whose weights training started from, and why (registry/warm_start.py)
    epochs: list[dict]
    role: str = "single"  # multi-worker training (TF_CONFIG): "chief", or e.g. "worker 1" (which writes nothing)


@dataclass(frozen=True)
class GradientExport:
    uri: str
    manifest_uri: str
    steps: list[int]
    variables: list[dict]  # per variable: name, shape, last, mean and max L2 norm
    anomalies: list[dict]  # snapshot steps kept for a non-finite value or a norm spike: step, reason
    # The smoothed B_simple's median over the last epoch (gradients/noise.py); None without per-example norms
    noise_scale_smoothed_median_last_epoch: float | None = None


@dataclass(frozen=True)
class Promotion:
    promoted: bool
    reason: str
    margin: float
    challenger: dict  # run_id, test_accuracy
    champion: dict | None  # the champion it was measured against
