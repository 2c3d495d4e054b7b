"""Stage 1, download: the dataset's files in the storage cache, verified or digested, whatever its source."""

from __future__ import annotations

from prefect import task

from tapeline.data.interface import DataRequest
from tapeline.data.sources import fetch_files
from tapeline.results import DatasetFiles
from tapeline.storage.root import Storage


@task(name="download")
def download(data: DataRequest, storage: str, refresh: bool) -> DatasetFiles:
    """Fetch and verify a registry dataset's IDX files, or digest (and decode) your own, into the storage cache."""
    return fetch_files(data, Storage(storage), refresh)
