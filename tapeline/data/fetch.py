"""Stage 1, download: put the dataset's four verified IDX files in the storage cache.

Where a file comes from, in order: the cache itself (nothing to do); `--source`
when given (an http(s) or file:// base URL, or a local directory); otherwise
Keras's own cache (`~/.keras/datasets/mnist.npz`) and then each mirror of the
registry. Every file is verified against the registry's digests before it is
renamed into the cache, so the cache only ever holds verified files.
`RegistrySource` is a registry dataset as a DataSource (tapeline/data/interface.py); the
other sources are listed beside it in tapeline/data/sources.py.
"""

from __future__ import annotations

import gzip
import os
import shutil
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from tapeline.data.idx import encode_idx
from tapeline.data.interface import DataRequest, without_decoding
from tapeline.data.registry import SPLIT_FILES, Dataset, DatasetFile
from tapeline.data.shape import DataShape
from tapeline.errors import TapelineError
from tapeline.results import DatasetFiles
from tapeline.storage.root import Storage, sha256_file, sha256_stream

ATTEMPTS = 3  # per URL, for errors that may pass once connected (timeouts, resets, 5xx)
BACKOFF_SECONDS = 1.0  # doubled after each failed attempt
TIMEOUT_SECONDS = 30
KERAS_SPLITS = {"train_images": "x_train", "train_labels": "y_train", "test_images": "x_test", "test_labels": "y_test"}
SOURCE_HINT = (
    "pass --source with a directory or URL of the four files, for example Debian's dataset-fashion-mnist: "
    "--dataset fashion-mnist --source /usr/share/datasets/fashion-mnist"
)


class DownloadError(TapelineError):
    """No source produced a verified file."""


class ChecksumError(TapelineError, ValueError):
    """A file's content is not what the registry says it must be."""


class RegistrySource:
    """A dataset of the registry as a DataSource: its shape and size are the registry's, its files verified against it."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def check(self, request: DataRequest) -> str | None:
        without_decoding(request)
        return request.source

    def train_count(self, request: DataRequest) -> int:
        return self.dataset.train_count

    def shape(self, request: DataRequest) -> DataShape:
        return self.dataset.shape

    def fetch(self, request: DataRequest, storage: Storage, refresh: bool = False) -> DatasetFiles:
        return fetch_dataset(self.dataset, storage, request.source, refresh)


def fetch_dataset(dataset: Dataset, storage: Storage, source: str | None = None, refresh: bool = False) -> DatasetFiles:
    """`refresh` fetches and verifies every file again; a cached copy is replaced only by a verified one."""
    paths, fetched = {}, False
    for split in SPLIT_FILES:
        spec = dataset.files[split]
        target = storage.layout.cache_file(dataset.name, spec.idx_sha256)
        if refresh or not storage.exists(target):
            _fetch_file(storage, dataset, split, spec, target, source)
            fetched = True
        paths[split] = storage.uri_of(target)
    return DatasetFiles(
        dataset=dataset.name,
        paths=paths,
        sha256={split: dataset.files[split].idx_sha256 for split in SPLIT_FILES},
        cached=not fetched,
        shape=dataset.shape,
    )


def _fetch_file(storage: Storage, dataset: Dataset, split: str, spec: DatasetFile, target: Path, source: str | None) -> None:
    failures = {}
    for place, fetch in _sources(dataset, split, spec, source):
        try:
            with storage.atomic(target) as temporary:
                fetch(temporary)
                verify(temporary, spec)
            return
        except (OSError, ValueError, KeyError, zlib.error, EOFError) as error:
            failures[place] = error
    tried = "; ".join(f"{place}: {_reason(error)}" for place, error in failures.items()) or "no source applies"
    if source:
        hint = f"--source must be a directory or URL of the four files of --dataset {dataset.name}"
        raise DownloadError(f"could not get {dataset.name} {spec.name} from --source ({tried}); {hint}")
    # Without --source the user may not know there is one: the message ends saying what to pass.
    unreachable = failures and all(map(_is_unreachable, failures.values()))
    nothing = "no mirror was reachable" if unreachable else "no source had a verified copy"
    raise DownloadError(f"could not get {dataset.name} {spec.name}: {nothing} ({tried}); {SOURCE_HINT}")


def _sources(dataset: Dataset, split: str, spec: DatasetFile, source: str | None):
    """(place, fetch(temporary_path)) pairs, in the order they are tried."""
    if source:
        if source.startswith(("http://", "https://", "file://")):
            url = source.rstrip("/") + "/" + spec.name
            yield url, lambda temporary: _download(url, temporary)
        else:
            path = Path(source).expanduser() / spec.name
            yield str(path), lambda temporary: shutil.copyfile(path, temporary)
        return
    archive = dataset.keras_archive
    keras_file = Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets" / archive.name if archive else None
    if keras_file and keras_file.exists():
        yield str(keras_file), lambda temporary: _from_keras_archive(keras_file, archive.sha256, split, temporary)
    for mirror in dataset.mirrors:
        url = mirror + spec.name
        yield url, lambda temporary, url=url: _download(url, temporary)


def verify(path: Path, spec: DatasetFile) -> None:
    """Accept the published archive, or any gzip whose IDX content is the published one."""
    archive_digest = sha256_file(path)
    if archive_digest == spec.archive_sha256:
        return
    with gzip.open(path) as handle:
        content_digest = sha256_stream(handle)
    if content_digest != spec.idx_sha256:
        raise ChecksumError(
            f"{spec.name}: SHA-256 mismatch: expected {spec.archive_sha256} (archive) "
            f"or {spec.idx_sha256} (IDX content), got {archive_digest} (archive), {content_digest} (IDX content)"
        )


def _download(url: str, destination: Path) -> None:
    """Fetch `url` into `destination`, retrying errors that may pass, with a progress bar after 1 s."""
    delay = BACKOFF_SECONDS
    for attempt in range(1, ATTEMPTS + 1):
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response, destination.open("wb") as out:
                _copy_with_progress(response, out, int(response.headers.get("Content-Length") or 0), url)
            return
        except urllib.error.HTTPError as error:
            if error.code < 500 and error.code != 429 or attempt == ATTEMPTS:
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            if attempt == ATTEMPTS or _is_unreachable(error) or _is_missing_file(error):
                raise
        time.sleep(delay)
        delay *= 2


def _is_unreachable(error: Exception) -> bool:
    """No connection was made (unknown host, no route, refused, connect timeout): the next mirror, not a retry.

    Offline, retries only made the user wait; a mirror that answers and then fails is retried.
    """
    reason = getattr(error, "reason", None)
    return (
        isinstance(error, urllib.error.URLError)
        and not isinstance(error, urllib.error.HTTPError)
        and isinstance(reason, OSError)
        and not isinstance(reason, FileNotFoundError)
    )


def _is_missing_file(error: urllib.error.URLError) -> bool:
    # A file:// URL that names nothing will not appear on a second try.
    return isinstance(getattr(error, "reason", None), FileNotFoundError)


def _copy_with_progress(response, out, total: int, url: str) -> None:
    started, progress, bar = time.monotonic(), None, None
    done = 0
    try:
        while chunk := response.read(1 << 16):
            out.write(chunk)
            done += len(chunk)
            if progress is None and time.monotonic() - started > 1.0:
                progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn())
                progress.start()
                bar = progress.add_task(url.rsplit("/", 1)[-1], total=total or None)
            if progress is not None:
                progress.update(bar, completed=done)
    finally:
        if progress is not None:
            progress.stop()


def _from_keras_archive(npz: Path, sha256: str, split: str, destination: Path) -> None:
    actual = sha256_file(npz)
    if actual != sha256:
        raise ChecksumError(f"{npz.name}: SHA-256 mismatch: expected {sha256}, got {actual}")
    with np.load(npz, allow_pickle=False) as arrays:
        idx = encode_idx(arrays[KERAS_SPLITS[split]])
    destination.write_bytes(gzip.compress(idx, mtime=0))


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, FileNotFoundError):
        return "no such file"
    return str(error) or type(error).__name__
