"""Your own data: `--dataset idx --source DIR`, any directory of the four IDX files in (Fashion-)MNIST's format.

Nothing checks these files against a list. Their IDX digests are taken on every run
and recorded as a registry dataset's are (run.json, the model card, the splits'
manifest); the cache and the preprocessed splits are keyed on them, so a directory
whose files change is a new dataset, and one that does not is served from the cache.

Each file is its standard name (FILE_NAMES), raw or with `.gz`. An optional
`classes.txt` names the classes, one per line in label order; without it the names
are the labels' own numbers, "0" up to the largest label seen.

Two checks, one rule set: `check_idx_source` reads only the headers, when the run's
parameters are checked (a bad directory stops the run before any stage, exit 2);
`fetch_idx_source`, the download stage, reads the files whole, takes their digests,
and finds what only the whole file shows (a truncated file, a label above 9).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from tapeline.data.idx import IdxError, parse_header, parse_idx
from tapeline.data.registry import SPLIT_FILES
from tapeline.data.splits import IMAGE_SHAPE, NUM_CLASSES
from tapeline.errors import ConfigError
from tapeline.results import DatasetFiles
from tapeline.storage.root import Storage, is_remote

IDX = "idx"  # the dataset parameter's value for a directory of one's own
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
NDIM = {"train_images": 3, "train_labels": 1, "test_images": 3, "test_labels": 1}
CLASSES_FILE = "classes.txt"
GZIP_MAGIC = b"\x1f\x8b"


class IdxSourceError(ConfigError):
    """The source of `--dataset idx` is not a directory of four good IDX files: bad input, nothing was done."""


def check_idx_source(source: str | None) -> str:
    """The source as an absolute directory, once its four files' headers and its classes.txt are good."""
    directory = source_directory(source)
    files = idx_files(directory)
    _check_shapes(files, {split: _header_shape(path, NDIM[split]) for split, path in files.items()})
    read_classes(directory)
    return str(directory)


def idx_train_count(source: str) -> int:
    """How many images the training file of a checked source holds, as its header says."""
    path = idx_files(source_directory(source))["train_images"]
    return _header_shape(path, NDIM["train_images"])[0]


def fetch_idx_source(source: str, storage: Storage, refresh: bool = False) -> DatasetFiles:
    """Read the four files whole, validate them, and put each in the storage cache under its IDX digest."""
    directory = source_directory(source)
    files = idx_files(directory)
    paths, digests, shapes, labels, fetched = {}, {}, {}, {}, False
    for split, path in files.items():
        archive, idx = _read(path)
        array = _parse(idx, NDIM[split], path)
        shapes[split] = array.shape
        if NDIM[split] == 1:
            labels[split] = array.copy()
        digests[split] = hashlib.sha256(idx).hexdigest()
        target = storage.layout.cache_file(IDX, digests[split])
        if refresh or not storage.exists(target):
            # The bytes just digested, not the file again: it may have changed since.
            with storage.atomic(target) as temporary:
                temporary.write_bytes(archive if archive is not None else gzip.compress(idx, compresslevel=6, mtime=0))
            fetched = True
        paths[split] = storage.uri_of(target)
    _check_shapes(files, shapes)
    return DatasetFiles(dataset=IDX, paths=paths, sha256=digests, cached=not fetched, classes=_classes(directory, files, labels))


def source_directory(source: str | None) -> Path:
    if not source:
        raise IdxSourceError(f"dataset {IDX} needs a source: the directory of your four IDX files (--source DIR)")
    if is_remote(source):
        raise IdxSourceError(f"dataset {IDX} reads a local directory; source {source!r} is a URL")
    directory = Path(source.removeprefix("file://")).expanduser().resolve()
    if not directory.is_dir():
        raise IdxSourceError(f"source {source!r} is not a directory (dataset {IDX} reads the four IDX files in one)")
    return directory


def idx_files(directory: Path) -> dict[str, Path]:
    """Each split's file, `<standard name>` or `<standard name>.gz`."""
    files, missing = {}, []
    for split in SPLIT_FILES:
        name = FILE_NAMES[split]
        found = [path for path in (directory / name, directory / f"{name}.gz") if path.is_file()]
        if len(found) == 2:
            raise IdxSourceError(f"{directory} has both {name} and {name}.gz; keep one")
        if found:
            files[split] = found[0]
        else:
            missing.append(name)
    if missing:
        raise IdxSourceError(f"{directory} has no {', '.join(missing)} (raw or .gz); dataset {IDX} needs all four IDX files")
    return files


def read_classes(directory: Path) -> tuple[str, ...] | None:
    """The names in classes.txt, one per line in label order; None when there is no such file."""
    path = directory / CLASSES_FILE
    if not path.exists():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise IdxSourceError(f"{path}: cannot read it as UTF-8 text ({error})") from None
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing blank line is no class
    names = [line.strip() for line in lines]
    if not names:
        raise IdxSourceError(f"{path} is empty: write one class name per line, in label order")
    if "" in names:
        raise IdxSourceError(f"{path}: line {names.index('') + 1} is blank; every label needs a name")
    if len(names) > NUM_CLASSES:
        raise IdxSourceError(f"{path} names {len(names)} classes; the model has {NUM_CLASSES} outputs")
    repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if repeated is not None:
        raise IdxSourceError(f"{path}: {repeated!r} names two classes")
    return tuple(names)


def _classes(directory: Path, files: dict[str, Path], labels: dict[str, np.ndarray]) -> tuple[str, ...]:
    """One name per output of the model: classes.txt's, then numbers for any output it does not name (all numbers
    without it); every label must have a name of classes.txt and an output."""
    split, largest = max(((split, int(values.max())) for split, values in labels.items() if values.size), key=lambda item: item[1])
    if largest >= NUM_CLASSES:
        raise IdxSourceError(f"{files[split].name}: label {largest}, but the model has {NUM_CLASSES} outputs (labels 0-{NUM_CLASSES - 1})")
    names = read_classes(directory)
    if names is not None and largest >= len(names):
        raise IdxSourceError(f"{directory / CLASSES_FILE} names {len(names)} classes, but {files[split].name} has label {largest}")
    names = names or ()
    return names + tuple(str(output) for output in range(len(names), NUM_CLASSES))  # a prediction can be any output


def _check_shapes(files: dict[str, Path], shapes: dict[str, tuple[int, ...]]) -> None:
    for split in ("train", "test"):
        images, labels = f"{split}_images", f"{split}_labels"
        count, *size = shapes[images]
        if tuple(size) != IMAGE_SHAPE[:2]:
            raise IdxSourceError(f"{files[images].name}: images are {'x'.join(map(str, size))}; the model takes 28x28 pixels, one uint8 channel")
        if count == 0:
            raise IdxSourceError(f"{files[images].name} holds no images")
        if count != shapes[labels][0]:
            raise IdxSourceError(f"{files[images].name} has {count} images but {files[labels].name} has {shapes[labels][0]} labels")


def _header_shape(path: Path, ndim: int) -> tuple[int, ...]:
    """The shape the file's header declares, read without reading the rest."""
    try:
        with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as handle:
            header = handle.read(4 + 4 * ndim)
    except (OSError, EOFError, zlib.error) as error:
        raise IdxSourceError(f"{path.name}: cannot read it ({_reason(error)})") from None
    return _parse(header, ndim, path, parse=parse_header)


def _read(path: Path) -> tuple[bytes | None, bytes]:
    """(the gzip archive as read, or None for a raw file; the IDX bytes)."""
    try:
        data = path.read_bytes()
        return (data, gzip.decompress(data)) if path.suffix == ".gz" else (None, data)
    except (OSError, EOFError, zlib.error) as error:
        raise IdxSourceError(f"{path.name}: not a complete gzip file ({_reason(error)})") from None


def _parse(data: bytes, ndim: int, path: Path, parse=parse_idx):
    if data.startswith(GZIP_MAGIC):
        raise IdxSourceError(f"{path.name} is gzipped: name it {path.name}.gz")
    try:
        return parse(data, ndim, path.name)
    except IdxError as error:
        raise IdxSourceError(str(error)) from None


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__
