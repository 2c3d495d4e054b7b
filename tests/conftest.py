"""Shared fixtures: small real IDX datasets, the real Fashion-MNIST files, one Prefect harness, free ports."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from tapeline.config import RunConfig  # noqa: E402
from tapeline.data.fetch import fetch_dataset  # noqa: E402
from tapeline.data.idx import encode_idx  # noqa: E402
from tapeline.data.registry import SPLIT_FILES, Dataset, DatasetFile  # noqa: E402
from tapeline.data.splits import prepare  # noqa: E402
from tapeline.results import PreparedData  # noqa: E402
from tapeline.storage.root import Storage  # noqa: E402

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


def tiny_arrays(n_train: int = 300, n_test: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """A learnable toy set: each class is a bright square at its own place."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            row, col = divmod(int(label), 5)
            images[i, 2 + row * 12 : 10 + row * 12, 1 + col * 5 : 5 + col * 5] = 230
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels
    return arrays


def write_idx_dir(directory: Path, arrays: dict[str, np.ndarray]) -> Dataset:
    """Write arrays as the four IDX gz files and return a registry entry that matches them."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    for split in SPLIT_FILES:
        idx = encode_idx(arrays[split])
        archive = gzip.compress(idx, mtime=0)
        (directory / FILE_NAMES[split]).write_bytes(archive)
        files[split] = DatasetFile(
            FILE_NAMES[split], hashlib.sha256(archive).hexdigest(), hashlib.sha256(idx).hexdigest()
        )
    return Dataset(name="tiny", mirrors=(), files=files, classes=tuple("0123456789"), train_count=len(arrays["train_labels"]))


def tiny_prepared(
    directory: Path, n_train: int = 300, n_test: int = 100, storage: str | None = None, **run
) -> tuple[RunConfig, PreparedData]:
    """A tiny dataset written to `directory`/source, fetched and preprocessed into `storage` (default
    `directory`/store): the validated config of a run on it (`run` are its fields besides dataset and storage)
    and the prepared splits, as the flow's first two stages would hand them to train."""
    source = directory / "source"
    dataset = write_idx_dir(source, tiny_arrays(n_train=n_train, n_test=n_test))
    config = RunConfig(dataset="mnist", storage=storage or str(directory / "store"), **run).validated()
    root = Storage(config.storage)
    return config, prepare(fetch_dataset(dataset, root, str(source)), root, config.seed, config.validation_size)


def free_ports(count: int) -> list[int]:
    """`count` different loopback ports that nothing listens on (each probe holds its port until all are chosen)."""
    with contextlib.ExitStack() as probes:
        sockets = [probes.enter_context(socket.socket()) for _ in range(count)]
        for probe in sockets:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in sockets]


def free_port() -> int:
    return free_ports(1)[0]


@pytest.fixture
def tiny(tmp_path) -> tuple[Dataset, Path]:
    """A tiny IDX dataset on disk, and its registry entry."""
    source = tmp_path / "source"
    return write_idx_dir(source, tiny_arrays()), source


@pytest.fixture(scope="session")
def fashion_mnist_dir() -> Path:
    if not (FASHION_MNIST_DIR / FILE_NAMES["train_images"]).exists():
        pytest.fail(f"{FASHION_MNIST_DIR} is missing: apt-get install -y dataset-fashion-mnist")
    return FASHION_MNIST_DIR


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test harness (a real local API on a temporary database) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@dataclass(frozen=True)
class ObjectStore:
    endpoint: str
    bucket: str

    def uri(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{prefix}"


class _OneWriteAtATime:
    """moto checks a conditional write's If-Match and then writes, unlocked, on a threaded server; S3 does both
    atomically. Under load two writers holding the same version both passed the check, and concurrent writes to one
    key crashed moto with a 500 that boto3 retried. Serialising writes gives S3's semantics; reads stay concurrent."""

    def __init__(self, app):
        self.app, self.lock = app, threading.Lock()

    def __call__(self, environ, start_response):
        if environ["REQUEST_METHOD"] in ("GET", "HEAD"):
            return self.app(environ, start_response)
        with self.lock:
            return list(self.app(environ, start_response))


@pytest.fixture(scope="session")
def s3(tmp_path_factory) -> ObjectStore:
    """A real S3-compatible server (moto's) on a loopback port, a bucket, and the AWS_* environment pointing at it.

    Every process the tests start inherits the environment; each test takes its own prefix.
    """
    import boto3
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = _OneWriteAtATime(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=MotoRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    environment = {
        "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "tapeline-test", "AWS_SECRET_ACCESS_KEY": "tapeline-secret",
        "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
    }  # fmt: skip
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    boto3.client("s3").create_bucket(Bucket="tapeline")
    yield ObjectStore(endpoint, "tapeline")
    server.shutdown()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
