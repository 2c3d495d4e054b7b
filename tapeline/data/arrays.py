"""Decoded images and labels in the storage cache: one gzipped `.npy` file per array, for the sources that decode.

`--dataset images` and `--dataset parquet` decode their images once, in the download
stage, and keep the arrays here: `cache/<dataset>/<digest>.gz`, a gzipped NumPy `.npy`
file (uint8 images [n, height, width, channels]; labels [n], uint8, or uint16 above 256
classes). The images' file is named by the digest of what they were decoded from and how
(the source files' own digests and the decoding options), so the same files are never
decoded twice and a changed one is a new dataset; the labels' by the digest of their
`.npy` bytes. Preprocessing reads these arrays as it reads the IDX files of the others.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from tapeline.data.decode import SourceError
from tapeline.storage.root import Storage

TRAIN_TEST = ("train", "test")


@dataclass(frozen=True)
class PendingSplit:
    """One split of a decoding source before it is decoded: its images' digest, its labels, and how to decode them."""

    images_sha256: str  # of what the images are decoded from and how (`listing_digest`)
    labels: np.ndarray
    decode: Callable[[], np.ndarray]  # the images, [n, height, width, channels] uint8, in the labels' order


@dataclass(frozen=True)
class CachedSplits:
    """Where the decoded arrays of both splits are, their digests (keyed by SPLIT_FILES) and the images' shape."""

    paths: dict[str, str]
    sha256: dict[str, str]
    cached: bool
    image_shape: tuple[int, int, int]


def listing_digest(files: list[tuple[str, str]], **options) -> str:
    """The digest of a split's images before decoding: its files' names and content digests, in order, and the options
    they are decoded with."""
    return hashlib.sha256(json.dumps({"files": files, **options}, sort_keys=True).encode()).hexdigest()


MAX_CLASSES = 1 << 16  # labels are uint16 at most


def label_array(labels, classes: int) -> np.ndarray:
    """Labels as stored: uint8, or uint16 when there are more than 256 classes."""
    if classes > MAX_CLASSES:
        raise SourceError(f"{classes} classes; tapeline takes at most {MAX_CLASSES}")
    return np.asarray(labels, dtype=label_dtype(classes))


def label_dtype(classes: int) -> type:
    """The labels' type for `classes` classes: uint8 up to 256, else uint16 (the splits' `label` column too)."""
    return np.uint8 if classes <= 256 else np.uint16


def cache_splits(storage: Storage, dataset: str, splits: dict[str, PendingSplit], refresh: bool = False) -> CachedSplits:
    """Decode each split whose arrays the cache lacks (all with `refresh`), and store them; the shapes must agree."""
    paths, digests, shapes, decoded = {}, {}, {}, False
    for split, pending in splits.items():
        images_path = storage.layout.cache_file(dataset, pending.images_sha256)
        labels_bytes = npy_bytes(pending.labels)
        labels_path = storage.layout.cache_file(dataset, hashlib.sha256(labels_bytes).hexdigest())
        if refresh or not storage.exists(images_path):
            images = pending.decode()
            _write(storage, images_path, npy_bytes(images))
            shapes[split], decoded = images.shape[1:], True
        else:
            shapes[split] = array_shape(storage, storage.uri_of(images_path))[1:]
        if refresh or not storage.exists(labels_path):
            _write(storage, labels_path, labels_bytes)
            decoded = True
        paths[f"{split}_images"], paths[f"{split}_labels"] = storage.uri_of(images_path), storage.uri_of(labels_path)
        digests[f"{split}_images"], digests[f"{split}_labels"] = pending.images_sha256, labels_path.stem
    if len(set(shapes.values())) > 1:
        raise SourceError(f"{dataset}: the train images are {_shape(shapes['train'])} but the test images {_shape(shapes['test'])}")
    return CachedSplits(paths, digests, not decoded, tuple(shapes["train"]))


def read_decoded_split(storage: Storage, files, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's images and labels from the cached arrays of a decoding source's DatasetFiles."""
    return read_array(storage, files.paths[f"{split}_images"]), read_array(storage, files.paths[f"{split}_labels"])


def read_array(storage: Storage, uri: str) -> np.ndarray:
    with gzip.open(storage.local(uri)) as handle:
        return np.load(io.BytesIO(handle.read()), allow_pickle=False)


def array_shape(storage: Storage, uri: str) -> tuple[int, ...]:
    """The shape a cached array's `.npy` header declares, read without the array."""
    with gzip.open(storage.local(uri)) as handle:
        version = np.lib.format.read_magic(handle)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read_header(handle)[0]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _write(storage: Storage, path, data: bytes) -> None:
    with storage.atomic(path) as temporary:
        temporary.write_bytes(gzip.compress(data, compresslevel=6, mtime=0))


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))
