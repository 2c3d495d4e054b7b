"""Stage 1, download: the dataset's four verified IDX files in the storage cache."""

from __future__ import annotations

from prefect import task

from tapeline.data.fetch import fetch_files
from tapeline.results import DatasetFiles
from tapeline.storage.root import Storage


@task(name="download")
def download(dataset: str, source: str | None, storage: str, refresh: bool) -> DatasetFiles:
    """Fetch and verify the dataset's four IDX files into the storage cache (idx: digest those of `source`)."""
    return fetch_files(dataset, Storage(storage), source, refresh)
