"""`--dataset parquet --source DIR`: Parquet files as the Hugging Face Hub stores an image-classification dataset.

The files are found under DIR at any depth (the Hub's `data/train-00000-of-00001.parquet`
layout, or `train-*.parquet` beside each other); a file's split is its name up to the
first `-` (or `.parquet`): `train` and `test` are read, in the order of their names, and
files of other splits (a Hub `validation`) are not: tapeline holds out its own
validation split from train. Each split's files sit in one directory.

The columns are found by type: the image column is the one of encoded images
(`struct<bytes: binary, path: string>`, the Hub's `Image` feature; decoded with
tapeline/data/decode.py) or of a `fixed_shape_tensor` of uint8, the label column the
integer one (with several candidates, the one named `image`/`img`, `label`/`labels`, or
the Hub's `ClassLabel`). The class names are the ClassLabel's `names`, from the files'
`huggingface` schema metadata, when there are some; else the labels' own numbers, "0"
up to the largest label seen.

Before any stage `check` reads the schemas and one image; the download stage digests
every file, reads the labels and decodes every image once, into the storage cache
(tapeline/data/arrays.py), named by the files' digests and the decoding options.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tapeline.data.arrays import PendingSplit, cache_splits, label_array, listing_digest
from tapeline.data.decode import Decoder, SourceError
from tapeline.data.interface import DataRequest, local_directory
from tapeline.data.shape import DataShape
from tapeline.results import DatasetFiles
from tapeline.storage.root import Storage, sha256_file

PARQUET = "parquet"  # the dataset parameter's value
SPLITS = ("train", "test")
SPLIT_OF_NAME = re.compile(r"^([^-.]+)[-.]")  # train-00000-of-00001.parquet, test.parquet
IMAGE_NAMES = ("image", "img")  # preferred among several image columns
LABEL_NAMES = ("label", "labels")  # preferred among several integer columns
DECODING = 1  # bump when the same files and options decode to other arrays


@dataclass(frozen=True)
class HubFiles:
    """A Parquet dataset as found: each split's files, its image and label columns, the ClassLabel's names if any."""

    directory: Path
    files: dict[str, list[Path]]  # "train", "test" -> files, by name
    image: str
    label: str
    names: tuple[str, ...] | None  # the label's class names from the `huggingface` metadata


class HubParquetSource:
    """`--dataset parquet`: the DataSource of Hub-style Parquet files (tapeline/data/interface.py)."""

    def check(self, request: DataRequest) -> str:
        found = find(request)
        _first_image(found, request)
        return str(found.directory)

    def train_count(self, request: DataRequest) -> int:
        return sum(pq.ParquetFile(path).metadata.num_rows for path in find(request).files["train"])

    def shape(self, request: DataRequest) -> DataShape:
        found = find(request)
        labels = None if found.names else {split: _labels(found, split) for split in SPLITS}
        return DataShape(_first_image(found, request).shape, _classes(found, labels))

    def fetch(self, request: DataRequest, storage: Storage, refresh: bool = False) -> DatasetFiles:
        found, decoder = find(request), Decoder(request.image_size, request.channels)
        labels = {split: _labels(found, split) for split in SPLITS}
        classes = _classes(found, labels)
        options = {"image": found.image, "image_size": request.image_size, "channels": request.channels, "decoding": DECODING}
        pending = {
            split: PendingSplit(
                images_sha256=listing_digest([[path.relative_to(found.directory).as_posix(), sha256_file(path)] for path in paths], **options),
                labels=label_array(labels[split], len(classes)),
                decode=lambda paths=paths: np.concatenate([_images(path, found.image, decoder) for path in paths]),
            )
            for split, paths in found.files.items()
        }
        cached = cache_splits(storage, PARQUET, pending, refresh)
        return DatasetFiles(PARQUET, cached.paths, cached.sha256, cached.cached, DataShape(cached.image_shape, classes), encoding="npy")


SOURCE = HubParquetSource()


def find(request: DataRequest) -> HubFiles:
    """The files of each split and the columns to read, from the names and the schemas; SourceError when they do not fit."""
    directory = local_directory(request.source, PARQUET, "your train-*.parquet and test-*.parquet files")
    files = {split: [] for split in SPLITS}
    for path in sorted(directory.rglob("*.parquet"), key=lambda p: p.name):
        split = SPLIT_OF_NAME.match(path.name)
        if split and split[1] in files and not any(part.startswith(".") for part in path.relative_to(directory).parts):
            files[split[1]].append(path)
    for split, paths in files.items():
        if not paths:
            raise SourceError(f"{directory} has no {split}-*.parquet file (at any depth); dataset {PARQUET} needs train and test files")
        places = sorted({str(path.parent) for path in paths})
        if len(places) > 1:
            raise SourceError(f"{split} files are in {places[0]} and {places[1]}: point --source at one dataset's files")
    schemas = {path: _schema(path) for paths in files.values() for path in paths}
    first = files["train"][0]
    image, label = _image_column(first, schemas[first]), _label_column(first, schemas[first])
    for path, schema in schemas.items():
        for name in (image, label):
            if schema.get_field_index(name) < 0 or schema.field(name).type != schemas[first].field(name).type:
                raise SourceError(f"{path}: no column {name!r} of {first.name}'s type {schemas[first].field(name).type}")
    return HubFiles(directory, files, image, label, _class_names(first, schemas[first], label))


def _schema(path: Path) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as error:
        raise SourceError(f"{path}: not a Parquet file ({error})") from None


def _is_image(field: pa.Field) -> bool:
    """A column of encoded images (the Hub's `Image`: struct<bytes: binary, path: string>) or of uint8 tensors."""
    kind = field.type
    if isinstance(kind, pa.FixedShapeTensorType):
        return True
    if not pa.types.is_struct(kind) or kind.get_field_index("bytes") < 0:
        return False
    encoded = kind.field("bytes").type
    return pa.types.is_binary(encoded) or pa.types.is_large_binary(encoded)


def _image_column(path: Path, schema: pa.Schema) -> str:
    return _one_of(path, [field.name for field in schema if _is_image(field)], IMAGE_NAMES, "image column (struct<bytes, path> or fixed_shape_tensor)")


def _label_column(path: Path, schema: pa.Schema) -> str:
    features = _features(schema)
    class_labels = [name for name, feature in features.items() if isinstance(feature, dict) and feature.get("_type") == "ClassLabel"]
    integers = [field.name for field in schema if pa.types.is_integer(field.type)]
    candidates = [name for name in class_labels if name in integers] or integers
    return _one_of(path, candidates, LABEL_NAMES, "integer label column")


def _one_of(path: Path, candidates: list[str], preferred: tuple[str, ...], what: str) -> str:
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise SourceError(f"{path}: no {what}")
    named = [name for name in preferred if name in candidates]
    if not named:
        raise SourceError(f"{path}: {len(candidates)} candidates for the {what} ({', '.join(candidates)}); name one {' or '.join(preferred)}")
    return named[0]


def _features(schema: pa.Schema) -> dict:
    metadata = (schema.metadata or {}).get(b"huggingface")
    if metadata is None:
        return {}
    try:
        features = json.loads(metadata).get("info", {}).get("features", {})
    except (ValueError, AttributeError):
        return {}
    return features if isinstance(features, dict) else {}


def _class_names(path: Path, schema: pa.Schema, label: str) -> tuple[str, ...] | None:
    """The ClassLabel's names of the label column in the `huggingface` metadata, if it has some."""
    feature = _features(schema).get(label)
    names = feature.get("names") if isinstance(feature, dict) else None
    if names is None:
        return None
    if not isinstance(names, list) or len(names) < 2 or len(set(map(str, names))) != len(names):
        raise SourceError(f"{path}: the huggingface metadata's class names of {label!r} must be 2 or more different names, got {names!r}")
    return tuple(map(str, names))


def _labels(found: HubFiles, split: str) -> np.ndarray:
    """A split's labels, every one of them present and not negative."""
    columns = []
    for path in found.files[split]:
        column = pq.read_table(path, columns=[found.label]).column(found.label)
        if column.null_count:
            raise SourceError(f"{path}: row {pc.index(pc.is_null(column), True).as_py()} has no {found.label}")
        values = column.to_numpy().astype(np.int64)
        if values.size and values.min() < 0:
            raise SourceError(f"{path}: row {int(np.argmin(values))} has {found.label} {values.min()}; every image needs a class, 0 or more")
        columns.append(values)
    return np.concatenate(columns)


def _classes(found: HubFiles, labels: dict[str, np.ndarray] | None) -> tuple[str, ...]:
    """The ClassLabel's names, every label naming one; without them "0" up to the largest label (`labels` needed then)."""
    if labels is None:
        return found.names
    split = max(SPLITS, key=lambda s: labels[s].max(initial=-1))
    largest = int(labels[split].max(initial=-1))
    if found.names is not None:
        if largest >= len(found.names):
            raise SourceError(f"{split} has {found.label} {largest}, but the huggingface metadata names {len(found.names)} classes")
        return found.names
    if largest < 1:
        raise SourceError(f"every {found.label} of {found.directory} is 0: a classifier needs at least 2 classes")
    return tuple(str(label) for label in range(largest + 1))


def _first_image(found: HubFiles, request: DataRequest) -> np.ndarray:
    path = found.files["train"][0]
    batch = next(pq.ParquetFile(path).iter_batches(batch_size=1, columns=[found.image]), None)
    if batch is None or batch.num_rows == 0:
        raise SourceError(f"{path} holds no rows")
    return _images(path, found.image, Decoder(request.image_size, request.channels), batch.column(0))[0]


def _images(path: Path, image: str, decoder: Decoder, column: pa.Array | None = None) -> np.ndarray:
    """A file's images (or those of `column`, some of its rows), decoded, converted and checked one by one."""
    column = column if column is not None else pq.read_table(path, columns=[image]).column(image).combine_chunks()
    if column.null_count:
        raise SourceError(f"{path}: row {pc.index(pc.is_null(column), True).as_py()} has no {image}")
    if isinstance(column.type, pa.FixedShapeTensorType):
        if column.type.value_type != pa.uint8():
            raise SourceError(f"{path}: {image} is a tensor of {column.type.value_type}; images must be uint8")
        return np.stack([decoder.convert(array, f"{path} row {row}") for row, array in enumerate(column.to_numpy_ndarray())])
    encoded = column.field("bytes")
    if encoded.null_count:
        row = pc.index(pc.is_null(encoded), True).as_py()
        raise SourceError(f"{path}: row {row}'s {image} has no bytes (only a path); tapeline reads the images the files hold")
    return np.stack([decoder.decode(data.as_py(), f"{path} row {row}") for row, data in enumerate(encoded)])
