"""`--dataset images --source DIR`: a folder of PNG and JPEG files, one subfolder per class.

Two layouts (docs/your-data.md#an-image-folder):

    DIR/train/<class>/*.png|jpg   DIR/test/<class>/…     the test split is yours
    DIR/<class>/*.png|jpg                                 a seeded fifth of each class is the test split

The classes are the (training) class folders' names, sorted; label i is the i-th. Within a
split the images are in the order of their paths, and `sample_id` is that index. Images
are decoded once, in the download stage (tapeline/data/decode.py: one shape for all, or
`--image-size`, `--channels`), and kept in the storage cache as arrays
(tapeline/data/arrays.py), named by the digest of the files' paths and content and the
decoding options: the same folder is read and digested again, never decoded again.

Before any stage, `check` walks the tree and decodes one image; the download stage
decodes them all, and finds what only that shows (a file that is no image, a size or
channel count that differs), one line naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tapeline.data.arrays import PendingSplit, cache_splits, label_array, listing_digest
from tapeline.data.decode import Decoder, SourceError
from tapeline.data.interface import DataRequest, local_directory
from tapeline.data.shape import DataShape
from tapeline.results import DatasetFiles
from tapeline.storage.root import Storage, sha256_file

IMAGES = "images"  # the dataset parameter's value
EXTENSIONS = (".png", ".jpg", ".jpeg")  # in any case
TEST_FRACTION = 0.2  # of each class, held out as the test split when the folder has no train/ and test/
DECODING = 1  # bump when the same files and options decode to other arrays


@dataclass(frozen=True)
class Folder:
    """An image folder as walked: its classes, and each split's files with their labels, in order."""

    directory: Path
    classes: tuple[str, ...]
    files: dict[str, list[tuple[Path, int]]]  # "train", "test" -> (path, label), sorted by path
    test_split: dict | None  # how the test split was held out ({"seed", "fraction"}), None when the folder has its own


class ImageFolderSource:
    """`--dataset images`: the DataSource of an image folder (tapeline/data/interface.py)."""

    def check(self, request: DataRequest) -> str:
        folder = walk(request)
        _decoder(request).decode(*_first(folder))
        return str(folder.directory)

    def train_count(self, request: DataRequest) -> int:
        return len(walk(request).files["train"])

    def shape(self, request: DataRequest) -> DataShape:
        folder = walk(request)
        return DataShape(_decoder(request).decode(*_first(folder)).shape, folder.classes)

    def fetch(self, request: DataRequest, storage: Storage, refresh: bool = False) -> DatasetFiles:
        folder, decoder = walk(request), _decoder(request)
        options = {"image_size": request.image_size, "channels": request.channels, "decoding": DECODING}
        pending = {}
        for split, files in folder.files.items():
            listing = [[path.relative_to(folder.directory).as_posix(), sha256_file(path)] for path, _ in files]
            pending[split] = PendingSplit(
                images_sha256=listing_digest(listing, **options),
                labels=label_array([label for _, label in files], len(folder.classes)),
                decode=lambda files=files: np.stack([decoder.decode(path, str(path)) for path, _ in files]),
            )
        cached = cache_splits(storage, IMAGES, pending, refresh)
        shape = DataShape(cached.image_shape, folder.classes)
        return DatasetFiles(IMAGES, cached.paths, cached.sha256, cached.cached, shape, encoding="npy", test_split=folder.test_split)


SOURCE = ImageFolderSource()


def walk(request: DataRequest) -> Folder:
    """The folder's classes and files, by its layout; SourceError naming what does not fit it."""
    directory = local_directory(request.source, IMAGES, "your images, one folder per class")
    train, test = directory / "train", directory / "test"
    if train.is_dir() != test.is_dir():
        has, lacks = ("train", "test") if train.is_dir() else ("test", "train")
        raise SourceError(
            f"{directory} has {has}/ but no {lacks}/: give both, or put the class folders in {directory} itself (a test split is then held out of each)"
        )
    if train.is_dir():
        classes = _class_folders(train)
        strays = sorted(set(_class_folders(test, at_least=1)) - set(classes))
        if strays:
            raise SourceError(f"{test / strays[0]} has no {train / strays[0]}: the model cannot learn a class it never trains on")
        files = {"train": _listing(train, classes, classes), "test": _listing(test, classes, _class_folders(test, at_least=1))}
        return Folder(directory, classes, files, None)
    classes = _class_folders(directory)
    train_files, test_files = _hold_out(_listing(directory, classes, classes), request.seed)
    if not test_files:
        raise SourceError(f"{directory}: too few images to hold out a test split ({TEST_FRACTION:.0%} of each class rounds to none)")
    return Folder(directory, classes, {"train": train_files, "test": test_files}, {"seed": request.seed, "fraction": TEST_FRACTION})


def _class_folders(directory: Path, at_least: int = 2) -> tuple[str, ...]:
    names = []
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            names.append(entry.name)
        elif entry.suffix.lower() in EXTENSIONS:
            raise SourceError(f"{entry}: an image outside a class folder; put it in {directory}/<class>/")
    if len(names) < at_least:
        raise SourceError(f"{directory} has {len(names)} class folders; a classifier needs at least 2 (one folder of images per class)")
    return tuple(names)


def _listing(directory: Path, classes: tuple[str, ...], present: tuple[str, ...]) -> list[tuple[Path, int]]:
    """Every image of the class folders `present` under `directory`, labelled by its class's place in `classes`."""
    files = []
    for name in present:
        images = [entry for entry in sorted((directory / name).iterdir()) if not entry.name.startswith(".")]
        for entry in images:
            if entry.is_dir():
                raise SourceError(f"{entry}: a folder inside the class folder {name}; its images go directly in {directory / name}")
            if entry.suffix.lower() not in EXTENSIONS:
                raise SourceError(f"{entry}: not a {', '.join(EXTENSIONS)} file; a class folder holds only images")
        if not images:
            raise SourceError(f"{directory / name} holds no images")
        files += [(entry, classes.index(name)) for entry in images]
    return files


def _hold_out(files: list[tuple[Path, int]], seed: int) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]]]:
    """(train, test): of each class, a seeded TEST_FRACTION (rounded) is test; both keep the listing's order."""
    rng = np.random.default_rng(seed)
    labels = np.array([label for _, label in files])
    is_test = np.zeros(len(files), dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        is_test[rng.permutation(members)[: int(len(members) * TEST_FRACTION + 0.5)]] = True
    return [f for f, test in zip(files, is_test) if not test], [f for f, test in zip(files, is_test) if test]


def _first(folder: Folder) -> tuple[Path, str]:
    path = folder.files["train"][0][0]
    return path, str(path)


def _decoder(request: DataRequest) -> Decoder:
    return Decoder(request.image_size, request.channels)
