"""What every data source is asked, and what it answers: the one interface the stages and the checks call.

A source is one module (registry datasets: fetch.py; `idx`: idx_source.py; `images`:
images.py; `parquet`: hub_parquet.py), listed once in tapeline/data/sources.py. Before any
stage the run's parameters are checked with `check`, `train_count` and `shape` (cheap: a
header, a folder tree and one image, a Parquet schema), and the download stage is `fetch`.
What `fetch` puts in the cache has one of two encodings, `DatasetFiles.encoding`: gzipped
IDX files (registry datasets, `idx`) or gzipped `.npy` arrays (the sources that decode
images: tapeline/data/arrays.py); the preprocess stage reads either the same way
(tapeline/data/sources.py: `read_cached_split`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

from tapeline.data.decode import SourceError
from tapeline.data.shape import DataShape
from tapeline.results import DatasetFiles
from tapeline.storage.root import Storage, is_remote


@dataclass(frozen=True)
class DataRequest:
    """The run parameters that say which data, and how to make arrays of it (names and meanings: tapeline/config.py)."""

    dataset: str
    source: str | None = None
    image_size: str | None = None  # "HxW": resize decoded images to it
    channels: int | None = None  # convert decoded images to 1 or 3 channels
    seed: int = 0  # carves the test split out of a one-folder image dataset

    @classmethod
    def of(cls, parameters) -> DataRequest:
        """The request of anything with these attributes: a RunConfig, a flow's parameters as an object."""
        return cls(**{field.name: getattr(parameters, field.name) for field in fields(cls)})


class DataSource(Protocol):
    def check(self, request: DataRequest) -> str | None:
        """The source as the run records it (a local directory made absolute), once a cheap look finds it usable;
        ConfigError (one line) when it is not."""

    def train_count(self, request: DataRequest) -> int:
        """How many samples the training data has, known before any stage."""

    def shape(self, request: DataRequest) -> DataShape:
        """The images' shape and the classes the model will get, known before any stage."""

    def fetch(self, request: DataRequest, storage: Storage, refresh: bool) -> DatasetFiles:
        """The download stage: the dataset's files in the storage cache, digested."""


def local_directory(source: str | None, dataset: str, holds: str) -> Path:
    """`source` as an absolute local directory; SourceError when there is none, or it is a URL or not a directory."""
    if not source:
        raise SourceError(f"dataset {dataset} needs a source: the directory of {holds} (--source DIR)")
    if is_remote(source):
        raise SourceError(f"dataset {dataset} reads a local directory; source {source!r} is a URL")
    directory = Path(source.removeprefix("file://")).expanduser().resolve()
    if not directory.is_dir():
        raise SourceError(f"source {source!r} is not a directory (dataset {dataset} reads {holds} in one)")
    return directory


def without_decoding(request: DataRequest) -> None:
    """SourceError when image_size or channels are given for a source whose images are arrays already (registry, idx)."""
    if request.image_size is not None or request.channels is not None:
        raise SourceError(f"image_size and channels apply to images that are decoded (dataset images or parquet), not to dataset {request.dataset}")
