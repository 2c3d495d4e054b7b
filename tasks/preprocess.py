"""Stage 2, preprocess: the cached files as train/validation/test Parquet splits, cached by content."""

from __future__ import annotations

from prefect import task

from tapeline.data.splits import prepare
from tapeline.results import DatasetFiles, PreparedData
from tapeline.storage.root import Storage


@task(name="preprocess")
def preprocess(files: DatasetFiles, storage: str, seed: int, validation_size: int, refresh: bool) -> PreparedData:
    """Read and check the cached files; write train/validation/test Parquet splits (cached by content)."""
    return prepare(files, Storage(storage), seed, validation_size, refresh)
