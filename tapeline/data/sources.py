"""Every data source, listed once: the `dataset` parameter's values, and what the checks and the stages call.

A registry dataset (tapeline/data/registry.py, fetched by fetch.py), `idx` (idx_source.py),
`images` (images.py) and `parquet` (hub_parquet.py) each answer the DataSource interface
(interface.py). A new source is one module and one entry of SOURCES.
"""

from __future__ import annotations

import numpy as np

from tapeline.data.arrays import read_decoded_split
from tapeline.data.fetch import RegistrySource
from tapeline.data.hub_parquet import PARQUET
from tapeline.data.hub_parquet import SOURCE as PARQUET_SOURCE
from tapeline.data.idx_source import IDX, read_idx_split
from tapeline.data.idx_source import SOURCE as IDX_SOURCE
from tapeline.data.images import IMAGES
from tapeline.data.images import SOURCE as IMAGES_SOURCE
from tapeline.data.interface import DataRequest, DataSource
from tapeline.data.registry import DATASETS
from tapeline.data.shape import DataShape
from tapeline.results import DatasetFiles
from tapeline.storage.root import Storage

SOURCES: dict[str, DataSource] = {
    **{name: RegistrySource(dataset) for name, dataset in DATASETS.items()},
    IDX: IDX_SOURCE,
    IMAGES: IMAGES_SOURCE,
    PARQUET: PARQUET_SOURCE,
}
OWN_DATA = (IDX, IMAGES, PARQUET)  # sources of the user's own, whose `source` is part of what a run is
READERS = {"idx": read_idx_split, "npy": read_decoded_split}  # by DatasetFiles.encoding


def source_of(dataset: str) -> DataSource:
    return SOURCES[dataset]


def data_shape(config) -> DataShape:
    """The images' shape and the classes the model will get, known before any stage: from the registry, the IDX
    headers (and labels), the image folder's tree and one image, or the Parquet files' schema and one image.

    `config` is anything with the attributes of DataRequest: a RunConfig, or a DataRequest itself
    (`data_shape(DataRequest("images", "/data/pets", image_size="64x64"))`). ConfigError when the source is bad input.
    """
    request = DataRequest.of(config)
    return source_of(request.dataset).shape(request)


def fetch_files(request: DataRequest, storage: Storage, refresh: bool = False) -> DatasetFiles:
    """The download stage, for whichever source the request names."""
    return source_of(request.dataset).fetch(request, storage, refresh)


def read_cached_split(storage: Storage, files: DatasetFiles, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The preprocess stage's input: a split's (`train` or `test`) images [n, height, width, channels] uint8 and labels [n]."""
    return READERS[files.encoding](storage, files, split)
