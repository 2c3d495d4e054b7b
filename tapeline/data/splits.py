"""Stage 2, preprocess: the cached files of any source to one Parquet file per split, plus a manifest beside them.

The splits' schema, their content-keyed directory and its manifest: docs/data-format.md#splits.
The images keep their shape (any height, width and channels: the manifest's `shape`, a
DataShape, which `PreparedData.shape` carries to the model).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tapeline.data.arrays import label_dtype
from tapeline.data.shape import DataShape
from tapeline.data.sources import read_cached_split
from tapeline.errors import ConfigError, TapelineError
from tapeline.results import DatasetFiles, PreparedData
from tapeline.storage.layout import DatasetPaths
from tapeline.storage.root import (
    Storage,
    content_key,
    utc_now,
)

FORMAT_VERSION = 3  # bump when the output of this stage changes for the same inputs (2: the manifest moved out; 3: its shape)
SPLITS = ("train", "validation", "test")


def prepare(files: DatasetFiles, storage: Storage, seed: int, validation_size: int, refresh: bool = False) -> PreparedData:
    """Write the splits unless the storage root has them already (`refresh` rebuilds them anyway)."""
    key = content_key({"sha256": files.sha256, "seed": seed, "validation_size": validation_size, "format": FORMAT_VERSION})
    prepared = storage.layout.dataset(files.dataset, key)
    cached = not refresh and storage.exists(prepared.manifest)
    if not cached:
        _write_splits(storage, files, prepared, seed, validation_size)
    manifest = storage.read_json(prepared.manifest)
    return PreparedData(
        dataset=files.dataset,
        directory=storage.uri_of(prepared.directory),
        uris={split: storage.uri_of(prepared.split(split)) for split in SPLITS},
        counts={split: manifest["splits"][split]["count"] for split in SPLITS},
        cached=cached,
        shape=DataShape.from_json(manifest["shape"]),
    )


def _write_splits(storage: Storage, files: DatasetFiles, prepared: DatasetPaths, seed: int, validation_size: int) -> None:
    train_images, train_labels = _read_pair(storage, files, "train")
    test_images, test_labels = _read_pair(storage, files, "test")
    shape = files.shape
    training_split(len(train_images), validation_size)  # checked before any stage too, from the registry or the headers

    # Seeded and sorted: the same seed always holds out the same samples, and each
    # split keeps the original order, so "the first N samples" means something.
    held_out = np.random.default_rng(seed).permutation(len(train_images))[:validation_size]
    is_validation = np.zeros(len(train_images), dtype=bool)
    is_validation[held_out] = True
    train_ids, validation_ids = np.flatnonzero(~is_validation), np.flatnonzero(is_validation)

    # Each split is renamed into place whole (written beside the directory, where no reader
    # of it looks), then the manifest beside it says all three are there: `prepare` trusts
    # nothing without it. A refresh replaces the files one by one, with the same content.
    splits = {}
    for split, images, labels, ids in (
        ("train", train_images, train_labels, train_ids),
        ("validation", train_images, train_labels, validation_ids),
        ("test", test_images, test_labels, np.arange(len(test_images))),
    ):
        storage.write_table(prepared.split(split), split_table(ids, images[ids], labels[ids], shape), prepared.directory, compression="zstd")
        splits[split] = {"count": len(ids), "class_counts": np.bincount(labels[ids], minlength=shape.num_classes).tolist()}
    train_pixels = train_images[train_ids].astype(np.float64) / 255.0
    storage.write_json(
        prepared.manifest,
        {
            "dataset": files.dataset,
            "source_sha256": files.sha256,
            "seed": seed,
            "validation_size": validation_size,
            "format": FORMAT_VERSION,
            "created": utc_now(),
            "shape": shape.to_json(),
            "test_split": files.test_split,
            # Statistics of x / 255 on the training split, for anyone standardising further.
            "pixel_mean": float(train_pixels.mean()),
            "pixel_std": float(train_pixels.std()),
            "splits": splits,
        },
    )


@dataclass(frozen=True)
class TrainingSplit:
    """The samples a run trains on: the training split (the training file less the validation hold-out), or
    its first `train_limit`, as `read_split` reads them."""

    train_count: int  # samples in the training file
    validation_size: int
    train_limit: int | None

    @property
    def available(self) -> int:
        return self.train_count - self.validation_size

    @property
    def used(self) -> int:
        return samples_used(self.available, self.train_limit)

    def check_batch_size(self, batch_size: int) -> None:
        """ConfigError when one batch would need more samples than training uses."""
        if batch_size <= self.used:
            return
        if self.used == self.train_limit:
            raise ConfigError(f"batch_size {batch_size} is larger than train_limit {self.train_limit}, the samples training uses")
        raise ConfigError(f"batch_size {batch_size} is larger than the training split's {self._size()}")

    def limit_note(self) -> str | None:
        """One line when train_limit asks for more samples than the split has (all of them are used), else None."""
        if self.train_limit is None or self.train_limit <= self.available:
            return None
        return f"train_limit {self.train_limit} is above the training split's {self._size()}: training on all {self.available}"

    def _size(self) -> str:
        return f"{self.available} samples ({self.train_count} less validation_size {self.validation_size})"


def samples_used(split_count: int, train_limit: int | None) -> int:
    """How many samples of a training split of `split_count` train: its first `train_limit`, or all of them."""
    return split_count if train_limit is None else min(train_limit, split_count)


def training_split(train_count: int, validation_size: int, train_limit: int | None = None) -> TrainingSplit:
    """The training split of a training file of `train_count` samples; ConfigError when validation takes them all."""
    if validation_size >= train_count:
        raise ConfigError(f"validation_size {validation_size} leaves no training samples: the training file has {train_count}")
    return TrainingSplit(train_count, validation_size, train_limit)


def single_label_warning(labels: np.ndarray) -> str | None:
    """One line when every training sample has the same label: the model can learn nothing but that answer."""
    values = np.unique(labels)
    if len(values) != 1:
        return None
    return f"warning: all {len(labels)} training samples have label {values[0]}: the model can learn only to answer {values[0]}"


def image_type(image_shape: tuple[int, int, int]) -> pa.DataType:
    """The splits' `image` column: a fixed-shape tensor of uint8, (height, width, channels)."""
    return pa.fixed_shape_tensor(pa.uint8(), list(image_shape))


def split_table(sample_ids: np.ndarray, images: np.ndarray, labels: np.ndarray, shape: DataShape) -> pa.Table:
    images = np.ascontiguousarray(images, dtype=np.uint8).reshape((-1, *shape.image_shape))
    storage = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1)), int(np.prod(shape.image_shape)))
    return pa.table(
        {
            "sample_id": pa.array(sample_ids, pa.int64()),
            "image": pa.ExtensionArray.from_storage(image_type(shape.image_shape), storage),
            "label": pa.array(labels, pa.from_numpy_dtype(label_dtype(shape.num_classes))),
        }
    )


def read_split(uri: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images [n, height, width, channels] uint8, labels [n] uint8 (uint16 above 256 classes), sample_ids [n] int64)
    of a split file."""
    table = pq.read_table(uri)
    if limit is not None:
        table = table.slice(0, limit)
    images = table.column("image").combine_chunks().to_numpy_ndarray()
    return images, table.column("label").to_numpy(), table.column("sample_id").to_numpy()


def _read_pair(storage: Storage, files: DatasetFiles, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's arrays from the cache, checked against what the download stage said they hold."""
    images, labels = read_cached_split(storage, files, split)
    if images.shape[1:] != files.shape.image_shape:
        raise TapelineError(f"{split} images are {images.shape[1:]}, but the download stage found {files.shape.image_shape}: rerun with --refresh")
    if len(images) != len(labels):
        raise TapelineError(f"{split} split has {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= files.shape.num_classes:
        raise TapelineError(f"{split} labels must be 0-{files.shape.num_classes - 1}, found {labels.max()}")
    return images, labels
