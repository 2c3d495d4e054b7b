"""The dataset registry: which files make a dataset, where they live, and their digests.

Every file carries two SHA-256 digests. `archive_sha256` is that of the published
`.gz`; `idx_sha256` is that of the IDX bytes inside it. A file is accepted when
either matches: Debian's `dataset-fashion-mnist` package re-gzips the upstream
archives (without the embedded file name), so its archives differ byte for byte
while the data is identical. The IDX digest is the dataset's identity: it is what
caches are keyed on and what run.json records.
"""

from __future__ import annotations

from dataclasses import dataclass

from tapeline.data.shape import DataShape

SPLIT_FILES = ("train_images", "train_labels", "test_images", "test_labels")


@dataclass(frozen=True)
class DatasetFile:
    name: str
    archive_sha256: str
    idx_sha256: str


@dataclass(frozen=True)
class KerasArchive:
    """A dataset as Keras caches it (`keras.datasets.*.load_data`): one `.npz`."""

    name: str
    sha256: str


@dataclass(frozen=True)
class Dataset:
    name: str
    mirrors: tuple[str, ...]
    files: dict[str, DatasetFile]  # keyed by SPLIT_FILES
    shape: DataShape  # its images' shape and its classes (the digests fix them): known before any download
    train_count: int  # images in its training file (the digests fix it): known before any download
    keras_archive: KerasArchive | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return self.shape.classes


MNIST = Dataset(
    name="mnist",
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "https://yann.lecun.com/exdb/mnist/",
    ),
    files={
        "train_images": DatasetFile(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        "train_labels": DatasetFile(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        "test_images": DatasetFile(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        "test_labels": DatasetFile(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    },
    shape=DataShape((28, 28, 1), tuple(str(digit) for digit in range(10))),
    keras_archive=KerasArchive("mnist.npz", "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"),
    train_count=60_000,
)

FASHION_MNIST = Dataset(
    name="fashion-mnist",
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    files={
        "train_images": DatasetFile(
            "train-images-idx3-ubyte.gz",
            "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        "train_labels": DatasetFile(
            "train-labels-idx1-ubyte.gz",
            "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        "test_images": DatasetFile(
            "t10k-images-idx3-ubyte.gz",
            "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        "test_labels": DatasetFile(
            "t10k-labels-idx1-ubyte.gz",
            "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    },
    shape=DataShape((28, 28, 1), ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")),
    train_count=60_000,
)

DATASETS: dict[str, Dataset] = {d.name: d for d in (MNIST, FASHION_MNIST)}
