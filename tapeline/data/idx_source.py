"""Your own data: `--dataset idx --source DIR`, any directory of the four IDX files in (Fashion-)MNIST's format.

Nothing checks these files against a list. Their IDX digests are taken on every run
and recorded as a registry dataset's are (run.json, the model card, the splits'
manifest); the cache and the preprocessed splits are keyed on them, so a directory
whose files change is a new dataset, and one that does not is served from the cache.

Each file is its standard name (FILE_NAMES), raw or with `.gz`. The image files are 3-D
(n, height, width: one channel) or 4-D (n, height, width, channels), of any size, the
same for train and test. An optional `classes.txt` names the classes, one per line in
label order (2 or more); without it the names are the labels' own numbers, "0" up to
the largest label seen.

Two checks, one rule set: `check` reads only the headers, when the run's parameters are
checked (a bad directory stops the run before any stage, exit 2); `fetch`, the download
stage, reads the files whole, takes their digests, and finds what only the whole file
shows (a truncated file, a label without a class).
"""

from __future__ import annotations

import gzip
import hashlib
import zlib
from pathlib import Path

import numpy as np

from tapeline.data.decode import SourceError
from tapeline.data.idx import IdxError, parse_header, parse_idx, read_idx_gz
from tapeline.data.interface import DataRequest, local_directory, without_decoding
from tapeline.data.registry import SPLIT_FILES
from tapeline.data.shape import DataShape
from tapeline.results import DatasetFiles
from tapeline.storage.root import Storage

IDX = "idx"  # the dataset parameter's value for a directory of one's own
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IMAGE_NDIM = (3, 4)  # (n, height, width) with one channel, or (n, height, width, channels)
NDIM = {"train_images": IMAGE_NDIM, "train_labels": 1, "test_images": IMAGE_NDIM, "test_labels": 1}
CLASSES_FILE = "classes.txt"
GZIP_MAGIC = b"\x1f\x8b"


class IdxSourceError(SourceError):
    """The source of `--dataset idx` is not a directory of four good IDX files: bad input, nothing was done."""


class IdxSource:
    """`--dataset idx`: the DataSource of a directory of IDX files (tapeline/data/interface.py)."""

    def check(self, request: DataRequest) -> str:
        """The source as an absolute directory, once its four files' headers and its classes.txt are good."""
        without_decoding(request)
        directory = source_directory(request.source)
        files = idx_files(directory)
        _image_shape(files, {split: _header_shape(path, NDIM[split]) for split, path in files.items()})
        read_classes(directory)
        return str(directory)

    def train_count(self, request: DataRequest) -> int:
        """How many images the training file of a checked source holds, as its header says."""
        path = idx_files(source_directory(request.source))["train_images"]
        return _header_shape(path, IMAGE_NDIM)[0]

    def shape(self, request: DataRequest) -> DataShape:
        """The images' shape from the headers; the classes from classes.txt, else from the labels (read whole: a byte each)."""
        directory = source_directory(request.source)
        files = idx_files(directory)
        image_shape = _image_shape(files, {split: _header_shape(path, NDIM[split]) for split, path in files.items()})
        labels = {split: _parse(_read(files[split])[1], 1, files[split]) for split in ("train_labels", "test_labels")}
        return DataShape(image_shape, _classes(directory, files, labels))

    def fetch(self, request: DataRequest, storage: Storage, refresh: bool = False) -> DatasetFiles:
        """Read the four files whole, validate them, and put each in the storage cache under its IDX digest."""
        directory = source_directory(request.source)
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
        shape = DataShape(_image_shape(files, shapes), _classes(directory, files, labels))
        return DatasetFiles(dataset=IDX, paths=paths, sha256=digests, cached=not fetched, shape=shape)


SOURCE = IdxSource()


def read_idx_split(storage: Storage, files: DatasetFiles, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's images [n, height, width, channels] and labels from the cached IDX files of a registry dataset or `idx`."""
    images = read_idx_gz(storage.local(files.paths[f"{split}_images"]), ndim=IMAGE_NDIM)
    labels = read_idx_gz(storage.local(files.paths[f"{split}_labels"]), ndim=1)
    return (images[..., None] if images.ndim == 3 else images), labels


def source_directory(source: str | None) -> Path:
    return local_directory(source, IDX, "your four IDX files")


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
    if len(names) < 2:
        raise IdxSourceError(f"{path} names 1 class; a classifier needs at least 2")
    repeated = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if repeated is not None:
        raise IdxSourceError(f"{path}: {repeated!r} names two classes")
    return tuple(names)


def _classes(directory: Path, files: dict[str, Path], labels: dict[str, np.ndarray]) -> tuple[str, ...]:
    """The class names: classes.txt's, every label naming one of them; without it, "0" up to the largest label."""
    split, largest = max(((split, int(values.max())) for split, values in labels.items() if values.size), key=lambda item: item[1])
    names = read_classes(directory)
    if names is not None and largest >= len(names):
        raise IdxSourceError(f"{directory / CLASSES_FILE} names {len(names)} classes, but {files[split].name} has label {largest}")
    if names is None and largest == 0:
        raise IdxSourceError(f"every label of {directory} is 0: a classifier needs at least 2 classes")
    return names or tuple(str(label) for label in range(largest + 1))


def _image_shape(files: dict[str, Path], shapes: dict[str, tuple[int, ...]]) -> tuple[int, int, int]:
    """The images' (height, width, channels), the same in both image files; as many labels as images, and some."""
    image_shapes = {}
    for split in ("train", "test"):
        images, labels = f"{split}_images", f"{split}_labels"
        count, *size = shapes[images]
        image_shapes[split] = (*size, 1) if len(size) == 2 else tuple(size)
        if count == 0:
            raise IdxSourceError(f"{files[images].name} holds no images")
        if count != shapes[labels][0]:
            raise IdxSourceError(f"{files[images].name} has {count} images but {files[labels].name} has {shapes[labels][0]} labels")
        if 0 in image_shapes[split]:
            raise IdxSourceError(f"{files[images].name}: images of {_size(image_shapes[split])} pixels have no pixels")
    if image_shapes["train"] != image_shapes["test"]:
        raise IdxSourceError(
            f"{files['test_images'].name}: images are {_size(image_shapes['test'])}, but {files['train_images'].name}'s are "
            f"{_size(image_shapes['train'])} (height x width x channels)"
        )
    return image_shapes["train"]


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _header_shape(path: Path, ndim: int | tuple[int, ...]) -> tuple[int, ...]:
    """The shape the file's header declares, read without reading the rest."""
    try:
        with gzip.open(path) if path.suffix == ".gz" else path.open("rb") as handle:
            header = handle.read(4 + 4 * max((ndim,) if isinstance(ndim, int) else ndim))
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


def _parse(data: bytes, ndim: int | tuple[int, ...], path: Path, parse=parse_idx):
    if data.startswith(GZIP_MAGIC):
        raise IdxSourceError(f"{path.name} is gzipped: name it {path.name}.gz")
    try:
        return parse(data, ndim, path.name)
    except IdxError as error:
        raise IdxSourceError(str(error)) from None


def _reason(error: Exception) -> str:
    return str(error) or type(error).__name__
