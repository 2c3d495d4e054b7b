"""Shared fixtures: a tiny IDX dataset, the real Fashion-MNIST files, one Prefect harness, the S3 test server.
The helpers they and the tests use are in tests/helpers.py."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

import tapeline.flows  # noqa: F401  (the environment's defaults, before Prefect loads)
from tapeline.data.registry import Dataset
from tests.helpers import FASHION_MNIST_DIR, FILE_NAMES, tiny_arrays, write_idx_dir


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


@pytest.fixture
def flow_log() -> list[str]:
    """What the flow and its tasks print (log_prints: to their run loggers, bound to the session's stderr, not capsys)."""
    lines, handler = [], logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    for logger in loggers:
        logger.addHandler(handler)
    yield lines
    for logger in loggers:
        logger.removeHandler(handler)


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
