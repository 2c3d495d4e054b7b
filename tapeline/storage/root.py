"""The storage root: where every stage reads and writes, and how it writes safely.

The layout: docs/data-format.md#the-storage-root; temporary names and atomic writes: docs/design.md#temporary-names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePath

import pyarrow as pa
import pyarrow.fs as pafs

TEMP_SUFFIX = ".tmp"  # every temporary name ends in this (the model's in TEMP_SUFFIX + ".keras")
MANIFEST_SUFFIX = ".manifest.json"  # a dataset directory's manifest is <directory>.manifest.json, beside it
WORKDIR_ENV = "TAPELINE_WORKDIR"  # where an object-store root's working copy lives on this machine
_LOCAL = pafs.LocalFileSystem()


def temporary_name(path: PurePath, suffix: str = "") -> str:
    """A unique name for `path`'s content until it is complete: hidden, ending in `.tmp` (then `suffix`, only for
    a writer that insists on one, like Keras on `.keras`); see the module's docstring."""
    return f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}{suffix}"


def manifest_path(directory: PurePath) -> PurePath:
    """The manifest of a dataset directory: beside it, so the directory holds nothing but the dataset's files."""
    return directory.with_name(directory.name + MANIFEST_SUFFIX)


@contextlib.contextmanager
def atomic_path(path: Path, staging: Path | None = None, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in `staging` (default: beside `path`; the same filesystem); rename it to `path`
    if the block succeeds. Files of a dataset directory pass the directory's parent as `staging`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = (staging or path.parent) / temporary_name(path, suffix)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary)
        elif temporary.exists():
            temporary.unlink()


def write_json(path: Path, value) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text())


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return sha256_stream(handle)


def sha256_stream(handle) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def content_key(value) -> str:
    """A short, stable key for a JSON-able value (used to name cache entries)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def is_remote(root: str) -> bool:
    """An object store or other non-local filesystem: anything with a scheme but file://."""
    return "://" in root and not root.startswith("file://")


def remote_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a URI: pyarrow's own (s3, gs, hdfs), else fsspec's (credentials from the environment)."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except pa.ArrowInvalid:  # a scheme pyarrow does not know natively
        import fsspec

        filesystem, path = fsspec.core.url_to_fs(uri)
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), path


class Storage:
    """The storage root of one deployment of tapeline: a local directory or an object store.

    Stages read and write local files under `root`. For a local root that is the
    root itself, and `fetch` and `publish` do nothing. For an object store
    (`s3://bucket/prefix`, `gs://…`) `root` is this machine's working copy
    ($TAPELINE_WORKDIR, default ~/.cache/tapeline/<hash of the URI>): `fetch`
    downloads a file into it, `publish` uploads a finished one. The object store
    is the only thing stages on different machines share.
    """

    def __init__(self, root: str | Path):
        self.uri, self.remote = str(root).rstrip("/"), is_remote(str(root))
        if self.remote:
            self.fs, self._prefix = remote_filesystem(self.uri)
            workdir = Path(os.environ.get(WORKDIR_ENV, Path.home() / ".cache" / "tapeline")).expanduser()
            self.root = workdir / content_key(self.uri)
        else:
            self.root = Path(self.uri.removeprefix("file://")).expanduser()

    def cache_file(self, dataset: str, idx_sha256: str) -> Path:
        return self.root / "cache" / dataset / f"{idx_sha256}.gz"

    def dataset_dir(self, dataset: str, key: str) -> Path:
        return self.root / "datasets" / dataset / key

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def uri_of(self, path: Path) -> str:
        """Where a file under `root` lives in the storage root: what run.json records."""
        return f"{self.uri}/{self._relative(path)}" if self.remote else str(path)

    def path_of(self, uri: str) -> Path:
        """The working-copy path of a URI that `uri_of` gave (on this machine or another)."""
        return self.root / uri.removeprefix(self.uri + "/") if self.remote else Path(uri)

    def local(self, uri: str) -> Path:
        """A local copy of the file at `uri`, for readers that need a path (Keras, gzip)."""
        return self.fetch(self.path_of(uri))

    def arrow(self, path: Path) -> tuple[pafs.FileSystem, str]:
        """Where a path of `root` is published, for Arrow to read in place: (filesystem, path)."""
        return (self.fs, self._key(path)) if self.remote else (_LOCAL, str(path))

    def exists(self, path: Path) -> bool:
        if not self.remote:
            return path.exists()
        return self.fs.get_file_info(self._key(path)).type != pafs.FileType.NotFound

    def fetch(self, path: Path) -> Path:
        """The local copy of a file of the storage root (downloaded anew from an object store)."""
        if self.remote:
            with atomic_path(path) as temporary:
                pafs.copy_files(self._key(path), str(temporary), source_filesystem=self.fs, destination_filesystem=_LOCAL)
        return path

    def publish(self, *paths: Path) -> None:
        """Make finished local files visible in the storage root, in the order given (object stores: upload).

        Object stores have no rename, and Arrow's S3 writer completes an upload even
        when the writer fails. So an upload goes to a temporary key at the root of the
        store (named like a local temporary file, and outside every dataset directory),
        and only a complete one is then copied to its final key, which the store does in
        one step: an upload that dies half-way leaves a hidden `.tmp` object that no
        reader takes, never a torn one.
        """
        if not self.remote:
            return
        for path in paths:
            key = self._key(path)
            staging = f"{self._prefix}/{temporary_name(path)}"
            pafs.copy_files(str(path), staging, source_filesystem=_LOCAL, destination_filesystem=self.fs)
            self.fs.move(staging, key)

    def delete(self, *paths: Path) -> None:
        """Remove files from an object store (locally, whoever made them removes them)."""
        for path in paths if self.remote else ():
            self.fs.delete_file(self._key(path))

    def listdir(self, directory: Path) -> list[str]:
        """Names of the entries of `directory` (none if it does not exist)."""
        if not self.remote:
            return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        selector = pafs.FileSelector(self._key(directory), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def write_json(self, path: Path, value) -> None:
        write_json(path, value)
        self.publish(path)

    def read_json(self, path: Path):
        return read_json(self.fetch(path))

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _key(self, path: Path) -> str:
        return f"{self._prefix}/{self._relative(path)}"
