"""Shared fixtures: a tiny IDX dataset, the real Fashion-MNIST files, a small tmpfs, one Prefect harness, the S3 test server;
and the `system` mark, put on every test that needs more than this process (see pytest_collection_modifyitems).
The helpers they and the tests use are in tests/helpers.py."""

from __future__ import annotations

import gc
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import types
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

import tapeline.flows  # noqa: F401  (the environment's defaults, before Prefect loads)
from tapeline.data.registry import Dataset
from tests.helpers import FASHION_MNIST_DIR, FILE_NAMES, tiny_arrays, write_idx_dir

# A test is a system test if it uses one of these fixtures (a real service, the real data, a real mount), or if its code,
# a fixture's it uses, or a function of tests/ they call names one of these: a process, a training, or a fixture taken
# by name (the S3 server or a tmpfs, for some of its parameters).
SYSTEM_FIXTURES = {"prefect_api", "s3", "fashion_mnist_dir", "small_disk"}
SYSTEM_NAMES = {"subprocess", "spawn_training", "holder_process", "run_with_imports", "train_model", "train_flow", "getfixturevalue"}


def pytest_configure(config) -> None:
    """Two directories for the session, made in the controller (or the one process without xdist) before any worker
    starts, so that its workers and every process a test starts inherit them, and removed when the session ends:
    - one XLA compilation cache: each step compiles once per model, shape and option in the session, not once per test;
    - TMPDIR: TensorFlow writes AutoGraph's generated code there and removes it at exit, which a process the tests
      SIGKILL never reaches; without it, those files stay in /tmp."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        config.session_directories = [tempfile.mkdtemp(prefix=f"tapeline-tests-{name}-") for name in ("xla", "tmp")]
        xla_cache, os.environ["TMPDIR"] = config.session_directories
        flags = os.environ.get("TF_XLA_FLAGS", "")
        os.environ["TF_XLA_FLAGS"] = f"{flags} --tf_xla_persistent_cache_directory={xla_cache}".strip()


def pytest_unconfigure(config) -> None:
    for directory in getattr(config, "session_directories", []):
        shutil.rmtree(directory, ignore_errors=True)


def pytest_collection_modifyitems(items) -> None:
    """Mark `system` every test that starts a process, trains, or uses a real service: `pytest -m "not system"` is the
    quick loop of unit tests, `pytest -m system` the rest. Then the modules with the most system tests go first, so
    that xdist hands out the longest ones while every worker is still free (each module keeps its order)."""
    mark_system(items)
    system = Counter(item.module.__name__ for item in items if item.get_closest_marker("system"))
    items.sort(key=lambda item: -system[item.module.__name__])


def mark_system(items) -> None:
    for item in items:
        fixtures = getattr(item, "_fixtureinfo", None)
        functions = [item.function] if isinstance(item, pytest.Function) else []
        if fixtures is not None:
            functions += [definition.func for definitions in fixtures.name2fixturedefs.values() for definition in definitions]
        if SYSTEM_FIXTURES & set(getattr(item, "fixturenames", ())) or any(SYSTEM_NAMES & names_used(f) for f in functions):
            item.add_marker(pytest.mark.system)


def names_used(function, depth: int = 3) -> set[str]:
    """The global and attribute names `function`'s code uses, with those of the functions of tests/ it calls, `depth`
    calls deep."""
    code = getattr(function, "__code__", None)
    if code is None:
        return set()
    names = code_names(code)
    if depth:
        for name in list(names):
            called = getattr(function, "__globals__", {}).get(name)
            if isinstance(called, types.FunctionType) and called.__module__.startswith("tests.") and called is not function:
                names |= names_used(called, depth - 1)
    return names


def code_names(code: types.CodeType) -> set[str]:
    """The names a code object uses, its nested functions' and lambdas' included."""
    return set(code.co_names).union(*(code_names(const) for const in code.co_consts if isinstance(const, types.CodeType)))


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
def small_disk(tmp_path):
    """mount(megabytes): a new tmpfs of that size, unmounted after the test (helpers.fill fills it)."""
    mounted, as_root = [], [] if os.geteuid() == 0 else ["sudo", "-n"]

    def mount(megabytes: int) -> Path:
        directory = tmp_path / f"disk{len(mounted)}"
        directory.mkdir()
        options = f"size={megabytes}m,uid={os.getuid()},gid={os.getgid()}"
        subprocess.run([*as_root, "mount", "-t", "tmpfs", "-o", options, "tmpfs", str(directory)], check=True)
        mounted.append(directory)
        return directory

    yield mount
    gc.collect()  # a failed write's exception, in a reference cycle, may still hold its (deleted) file open
    for directory in mounted:
        subprocess.run([*as_root, "umount", str(directory)], check=True)


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
