"""The storage root: where every stage reads and writes, and how it writes safely.

What lives where under the root is tapeline/storage/layout.py's (`storage.layout`; for users:
docs/data-format.md#the-storage-root).

Nothing that looks complete is ever half-written: files are written under a
temporary name and renamed into place, which is atomic on a POSIX filesystem; on
an object store they are uploaded under a temporary key and copied to the final
key, which is atomic there (see `Storage._publish`). The rule for temporary names:

- A temporary name is hidden and ends in `.tmp`: `.<final name>.<8 hex>.tmp`. It
  never ends in a suffix that readers glob for complete files (`*.parquet`,
  `*.json`, `*.gz`), so a query such as `read_parquet('<run>/gradients/**/*.parquet')`
  sees complete files only, during a write and after a writer was killed. The one
  exception is the model: Keras saves only to a name ending in `.keras`, so its
  temporary name is `.model.keras.<8 hex>.tmp.keras`, which no dataset glob matches.
- It sits beside its final name, except for the files of a Parquet dataset
  directory: those are written beside the dataset directory (`Storage.write_table`),
  because Polars reads every file under a directory it is given, hidden ones
  included. An object store stages every upload at its root.

There is one way to write a file of the root, and it publishes as it commits:
`Storage.atomic` (and `write_json`, `write_table` on it) renames the finished
file into place and uploads it to an object store in the same step, so no writer
can leave a file on one machine by forgetting the upload. Files that TensorFlow
writes itself (checkpoints, event files) are written inside `Storage.publishing`,
which uploads, when the block ends, what changed since this process last
published it.

A full disk, wherever it is met, is one error: `StorageFull`, whose message names the
root and says what to do. Every write of the root passes through `Storage.writing`
(`atomic`, `publishing` and `fetch` do), which recognises "no space left on device"
in the forms Python, pyarrow and TensorFlow raise it (`is_disk_full`); the temporary
file is gone by then.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tapeline.errors import TapelineError
from tapeline.storage.layout import LOCAL, Layout, is_remote, remote_filesystem

TEMP_SUFFIX = ".tmp"  # every temporary name ends in this (the model's in TEMP_SUFFIX + ".keras")
WORKDIR_ENV = "TAPELINE_WORKDIR"  # where an object-store root's working copy lives on this machine
_NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device": TensorFlow's errors carry only the message


class StorageFull(TapelineError):
    """The device that holds the storage root (or its working copy) has no space left."""


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error that caused it, is the device's "no space left": errno ENOSPC (Python's OSError,
    pyarrow's) or TensorFlow's message for it (a ResourceExhaustedError from a checkpoint or an event file)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if getattr(error, "errno", None) == errno.ENOSPC or _NO_SPACE in str(error):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def temporary_name(path: PurePath, suffix: str = "") -> str:
    """A unique name for `path`'s content until it is complete: hidden, ending in `.tmp` (then `suffix`, only for
    a writer that insists on one, like Keras on `.keras`); see the module's docstring."""
    return f".{path.name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}{suffix}"


@contextlib.contextmanager
def atomic_path(path: Path, staging: Path | None = None, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path in `staging` (default: beside `path`; the same filesystem); rename it to `path`
    if the block succeeds. Files of a dataset directory pass the directory's parent as `staging`.

    Local only: files of the storage root are written with `Storage.atomic`, which also publishes them."""
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


@dataclass(frozen=True)
class StoredFile:
    """A file of the storage root as its store lists it."""

    path: Path  # its path under `Storage.root`
    size: int  # bytes
    modified: float  # seconds since the epoch


class Storage:
    """The storage root of one deployment of tapeline: a local directory or an object store.

    Stages read and write local files under `root`, at the places `layout` names.
    For a local root that is the root itself, and `fetch` and publishing do nothing.
    For an object store (`s3://bucket/prefix`, `gs://…`) `root` is this machine's
    working copy ($TAPELINE_WORKDIR, default ~/.cache/tapeline/<hash of the URI>):
    `fetch` downloads a file into it, and every write uploads the file it finished.
    The object store is the only thing stages on different machines share.
    """

    def __init__(self, root: str | Path):
        self.uri, self.remote = str(root).rstrip("/"), is_remote(str(root))
        if self.remote:
            self.fs, self._prefix = remote_filesystem(self.uri)
            workdir = Path(os.environ.get(WORKDIR_ENV, Path.home() / ".cache" / "tapeline")).expanduser()
            self.root = workdir / content_key(self.uri)
        else:
            self.root = Path(self.uri.removeprefix("file://")).expanduser()
        self.layout = Layout(self.root)
        self._synced: dict[Path, tuple[int, int]] = {}  # working-copy files as last published or fetched: their stamps

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
        return (self.fs, self._key(path)) if self.remote else (LOCAL, str(path))

    def exists(self, path: Path) -> bool:
        if not self.remote:
            return path.exists()
        return self.fs.get_file_info(self._key(path)).type != pafs.FileType.NotFound

    def fetch(self, path: Path) -> Path:
        """The local copy of a file of the storage root (downloaded anew from an object store)."""
        if self.remote:
            with self.writing(path), atomic_path(path) as temporary:
                pafs.copy_files(self._key(path), str(temporary), source_filesystem=self.fs, destination_filesystem=LOCAL)
            self._synced[path] = _stamp(path)
        return path

    @contextlib.contextmanager
    def atomic(self, path: Path, staging: Path | None = None, suffix: str = "") -> Iterator[Path]:
        """Write `path` whole or not at all: yield a temporary path (see `atomic_path` for `staging` and
        `suffix`); if the block succeeds, rename it into place and publish it to the storage root."""
        with self.writing(path):
            with atomic_path(path, staging, suffix) as temporary:
                yield temporary
            self._publish(path)

    @contextlib.contextmanager
    def writing(self, path: Path) -> Iterator[None]:
        """Around a write of `path` (a file or directory of `root`): no space left on the device raises `StorageFull`.

        `atomic`, `publishing` and `fetch` write inside it; wrap what a library writes on its own outside those."""
        try:
            yield
        except TapelineError:  # already a line the user can act on
            raise
        except Exception as error:
            if not is_disk_full(error):
                raise
            raise StorageFull(self._no_space(path)) from error

    def _no_space(self, path: Path) -> str:
        where = f"the working copy {self.root} of the storage root {self.uri}" if self.remote else f"the storage root {self.root}"
        try:
            written = f" (writing {self._relative(path)})"
        except ValueError:  # not under the root
            written = ""
        return f"no space left on the device of {where}{written}: free space there and rerun; the run resumes where it stopped"

    def write_json(self, path: Path, value) -> None:
        with self.atomic(path) as temporary:
            temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")

    def write_table(self, path: Path, table: pa.Table, dataset: Path, **options) -> None:
        """Write `table` as `path`, a Parquet file of the dataset directory `dataset` (directly in it, or in a
        partition of it), staged beside that directory, where no reader of the dataset looks."""
        with self.atomic(path, staging=dataset.parent) as temporary:
            pq.write_table(table, temporary, **options)

    @contextlib.contextmanager
    def publishing(self, directory: Path, last: str | None = None) -> Iterator[Path]:
        """For files a library writes itself into `directory` (TensorFlow's checkpoints and event files): when the
        block ends, publish every file there that is new or changed since this process last published or fetched
        it (so also what a library wrote before the block, like a background flush), the one named `last` (an
        index of the others) after them. A full disk raises `StorageFull` (see `writing`)."""
        with self.writing(directory):
            yield directory
        if self.remote and directory.is_dir():
            files = [path for path in directory.iterdir() if path.is_file()]
            changed = [path for path in files if self._synced.get(path) != _stamp(path)]
            self._publish(*sorted(changed, key=lambda path: (path.name == last, path.name)))

    def _publish(self, *paths: Path) -> None:
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
            key, stamp = self._key(path), _stamp(path)
            staging = f"{self._prefix}/{temporary_name(path)}"
            pafs.copy_files(str(path), staging, source_filesystem=LOCAL, destination_filesystem=self.fs)
            self.fs.move(staging, key)
            self._synced[path] = stamp

    def files(self, directory: Path) -> list[StoredFile]:
        """Every file under `directory` in the storage root, at any depth, as the store lists it (none if it is absent)."""
        filesystem, base = self.arrow(directory)
        listing = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return [
            StoredFile(directory / PurePosixPath(info.path).relative_to(base), info.size, info.mtime.timestamp())
            for info in listing
            if info.type == pafs.FileType.File
        ]

    def remove(self, *paths: Path) -> None:
        """Delete files of the storage root, in the order given: in an object store, and in this machine's working
        copy; a file already gone is no error (a deletion that was cut short is simply done again)."""
        for path in paths:
            if self.remote:
                with contextlib.suppress(FileNotFoundError):
                    self.fs.delete_file(self._key(path))
            path.unlink(missing_ok=True)

    def move(self, source: Path, target: Path) -> None:
        """Rename a file of the storage root, whole: locally a rename, which needs no free space; in an object store
        a copy made by the store, then the source deleted. This machine's working copy follows."""
        if self.remote:
            self.fs.move(self._key(source), self._key(target))
            with contextlib.suppress(FileNotFoundError):
                os.replace(source, target)
        else:
            os.replace(source, target)

    def remove_directory(self, directory: Path) -> None:
        """Remove `directory` once `remove` took its files: its empty local directories, and, from an object store,
        the directory markers Arrow leaves there (with whatever else is left under its key) and this machine's
        working copy of it."""
        if self.remote:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_dir(self._key(directory))
            shutil.rmtree(directory, ignore_errors=True)
            return
        for parent, _, _ in sorted(os.walk(directory), key=lambda entry: -len(entry[0])):  # the deepest first
            with contextlib.suppress(OSError):  # not empty: someone wrote there since
                os.rmdir(parent)

    def listdir(self, directory: Path) -> list[str]:
        """Names of the entries of `directory` (none if it does not exist)."""
        if not self.remote:
            return sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
        selector = pafs.FileSelector(self._key(directory), allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    def read_json(self, path: Path):
        return read_json(self.fetch(path))

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _key(self, path: Path) -> str:
        return f"{self._prefix}/{self._relative(path)}"


def _stamp(path: Path) -> tuple[int, int]:
    """What tells a changed file: (size, modification time in ns)."""
    status = path.stat()
    return status.st_size, status.st_mtime_ns
