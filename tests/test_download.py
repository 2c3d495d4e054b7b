import gzip
import hashlib
import http.server
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tapeline.data.fetch import SOURCE_HINT, ChecksumError, DownloadError, fetch_dataset, verify
from tapeline.data.registry import DATASETS, SPLIT_FILES, KerasArchive
from tapeline.storage.root import Storage
from tests.helpers import tiny_arrays


def cache_files(storage: Storage) -> list[Path]:
    return sorted((storage.root / "cache").rglob("*"))


def test_local_directory_then_cache(tiny, tmp_path):
    dataset, source = tiny
    storage = Storage(tmp_path / "store")
    first = fetch_dataset(dataset, storage, str(source))
    assert not first.cached
    assert first.sha256 == {s: dataset.files[s].idx_sha256 for s in SPLIT_FILES}
    for split in SPLIT_FILES:
        assert Path(first.paths[split]).read_bytes() == (source / dataset.files[split].name).read_bytes()
    # Second run: the source is gone, and nothing is fetched.
    second = fetch_dataset(dataset, storage, str(tmp_path / "gone"))
    assert second.cached and second.paths == first.paths


def test_refresh_fetches_again_and_keeps_the_cache_on_failure(tiny, tmp_path):
    dataset, source = tiny
    storage = Storage(tmp_path / "store")
    first = fetch_dataset(dataset, storage, str(source))
    cached = Path(first.paths["train_images"])
    cached.write_bytes(b"damaged")  # what a refresh is for
    again = fetch_dataset(dataset, storage, str(source), refresh=True)
    assert not again.cached and cached.read_bytes() == (source / dataset.files["train_images"].name).read_bytes()
    # A refresh whose source fails leaves the verified copies in place.
    with pytest.raises(DownloadError):
        fetch_dataset(dataset, storage, str(tmp_path / "gone"), refresh=True)
    assert [p.read_bytes() for p in cache_files(storage) if p.is_file()] == [
        (source / dataset.files[split].name).read_bytes() for split in sorted(SPLIT_FILES, key=lambda s: dataset.files[s].idx_sha256)
    ]


def test_file_url_source(tiny, tmp_path):
    dataset, source = tiny
    files = fetch_dataset(dataset, Storage(tmp_path / "store"), source.as_uri())
    assert not files.cached and all(Path(p).exists() for p in files.paths.values())


def test_checksum_mismatch_names_file_and_digests(tiny, tmp_path):
    dataset, source = tiny
    name = dataset.files["train_labels"].name
    (source / name).write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07", mtime=0))
    storage = Storage(tmp_path / "store")
    with pytest.raises(DownloadError) as raised:
        fetch_dataset(dataset, storage, str(source))
    message = str(raised.value)
    assert name in message and dataset.files["train_labels"].idx_sha256 in message and "got" in message
    assert "\n" not in message
    # Only the file verified before the failure is in the cache; no temporary is left behind.
    cached = [p.name for p in cache_files(storage) if p.is_file()]
    assert cached == [dataset.files["train_images"].idx_sha256 + ".gz"]


def test_regzipped_archive_is_accepted_by_content(tiny, tmp_path):
    """Debian's package re-gzips the upstream archives: other bytes, same IDX content."""
    dataset, source = tiny
    spec = dataset.files["train_images"]
    path = tmp_path / "regzipped.gz"
    path.write_bytes(gzip.compress(gzip.decompress((source / spec.name).read_bytes()), compresslevel=1, mtime=123))
    assert hashlib.sha256(path.read_bytes()).hexdigest() != spec.archive_sha256
    verify(path, spec)  # accepted


def test_truncated_gzip_is_rejected(tiny, tmp_path):
    dataset, source = tiny
    spec = dataset.files["train_images"]
    path = tmp_path / "truncated.gz"
    path.write_bytes((source / spec.name).read_bytes()[:500])
    with pytest.raises((ChecksumError, EOFError, OSError)):
        verify(path, spec)


def test_missing_source_lists_every_place_tried(tiny, tmp_path):
    dataset, _ = tiny
    with pytest.raises(DownloadError) as raised:
        fetch_dataset(dataset, Storage(tmp_path / "store"), str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(raised.value) and "no such file" in str(raised.value)


class FlakyServer(http.server.ThreadingHTTPServer):
    """Serves a directory; answers 503 to the first request for each file."""

    def __init__(self, directory: Path):
        self.directory, self.seen, self.requests = directory, set(), []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(handler):
                self.requests.append(handler.path)
                path = self.directory / handler.path.lstrip("/")
                if not path.exists():
                    handler.send_error(404)
                elif handler.path not in self.seen:
                    self.seen.add(handler.path)
                    handler.send_error(503)
                else:
                    data = path.read_bytes()
                    handler.send_response(200)
                    handler.send_header("Content-Length", str(len(data)))
                    handler.end_headers()
                    handler.wfile.write(data)

            def log_message(handler, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


@pytest.fixture
def flaky_server(tiny):
    server = FlakyServer(tiny[1])
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_mirrors_over_http_with_retry(tiny, tmp_path, flaky_server, monkeypatch):
    monkeypatch.setattr("tapeline.data.fetch.BACKOFF_SECONDS", 0.01)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras"))
    dead = "http://127.0.0.1:9/"  # discard port: connection refused
    dataset = replace(tiny[0], mirrors=(dead, flaky_server.url()))
    files = fetch_dataset(dataset, Storage(tmp_path / "store"))
    assert not files.cached
    # Each file: one 503, then a success from the same mirror.
    assert len(flaky_server.requests) == 2 * len(SPLIT_FILES)


def test_http_404_everywhere_is_one_error(tiny, tmp_path, flaky_server, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras"))
    dataset = replace(tiny[0], mirrors=(flaky_server.url() + "missing/",))
    with pytest.raises(DownloadError) as raised:
        fetch_dataset(dataset, Storage(tmp_path / "store"))
    assert "HTTP 404" in str(raised.value) and flaky_server.url() in str(raised.value)


_connects: list | None = None  # socket.connect addresses, while a test counts them


def _count_connects(event: str, args: tuple) -> None:
    if event == "socket.connect" and _connects is not None:
        _connects.append(args[1])


def test_unreachable_mirrors_are_not_retried_and_the_error_says_to_pass_source(tiny, tmp_path, monkeypatch):
    """Offline, retrying an address that cannot be reached only makes the user wait: one attempt per mirror."""
    global _connects
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "no-keras"))
    dataset = replace(tiny[0], mirrors=("http://127.0.0.1:9/a/", "http://127.0.0.1:9/b/"))  # the discard port: refused
    sys.addaudithook(_count_connects)  # audit hooks stay for the process; this one counts only inside this test
    _connects = []
    try:
        with pytest.raises(DownloadError) as raised:
            fetch_dataset(dataset, Storage(tmp_path / "store"))
        assert _connects == [("127.0.0.1", 9)] * 2
    finally:
        _connects = None
    assert "no mirror was reachable" in str(raised.value) and str(raised.value).endswith(SOURCE_HINT)


def test_keras_cache_is_used_without_pickle(tmp_path, monkeypatch):
    arrays = tiny_arrays()
    keras_home = tmp_path / "keras"
    (keras_home / "datasets").mkdir(parents=True)
    npz = keras_home / "datasets" / "mnist.npz"
    np.savez(npz, x_train=arrays["train_images"], y_train=arrays["train_labels"], x_test=arrays["test_images"], y_test=arrays["test_labels"])
    monkeypatch.setenv("KERAS_HOME", str(keras_home))
    from tests.helpers import write_idx_dir

    dataset = write_idx_dir(tmp_path / "reference", arrays)
    dataset = replace(dataset, keras_archive=KerasArchive("mnist.npz", hashlib.sha256(npz.read_bytes()).hexdigest()))
    files = fetch_dataset(dataset, Storage(tmp_path / "store"))
    assert files.sha256 == {s: dataset.files[s].idx_sha256 for s in SPLIT_FILES}


def test_registry_is_complete():
    for dataset in DATASETS.values():
        assert set(dataset.files) == set(SPLIT_FILES) and dataset.mirrors
        for spec in dataset.files.values():
            assert len(spec.archive_sha256) == len(spec.idx_sha256) == 64


def test_debian_fashion_mnist_matches_registry(fashion_mnist_dir, tmp_path):
    files = fetch_dataset(DATASETS["fashion-mnist"], Storage(tmp_path), str(fashion_mnist_dir))
    assert files.sha256 == {s: DATASETS["fashion-mnist"].files[s].idx_sha256 for s in SPLIT_FILES}
