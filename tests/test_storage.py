"""The storage layer against a real S3-compatible server: publish, fetch, list, and validation of object-store roots."""

import pyarrow.fs as pafs
import pytest

from tapeline.config import RunConfig
from tapeline.errors import ConfigError
from tapeline.storage.root import Storage


def test_publish_then_fetch_on_another_machine(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "machine-a"))
    writer = Storage(s3.uri("publish"))
    assert writer.remote and writer.root.is_relative_to(tmp_path / "machine-a")
    run = writer.run_dir("r1")
    writer.write_json(run / "run.json", {"run_id": "r1"})
    (run / "model.keras").parent.mkdir(parents=True, exist_ok=True)
    (run / "model.keras").write_bytes(b"weights" * 1000)
    writer.publish(run / "model.keras")
    assert writer.uri_of(run / "model.keras") == s3.uri("publish") + "/runs/r1/model.keras"

    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "machine-b"))
    reader = Storage(s3.uri("publish"))
    run_b = reader.run_dir("r1")
    assert not run_b.exists() and reader.exists(run_b / "model.keras")
    assert reader.read_json(run_b / "run.json") == {"run_id": "r1"}
    assert reader.listdir(reader.root / "runs") == ["r1"]
    assert reader.listdir(run_b) == ["model.keras", "run.json"]
    assert reader.local(writer.uri_of(run / "model.keras")).read_bytes() == b"weights" * 1000
    # Uploads pass through temporary keys and leave nothing else behind, not even directory markers.
    filesystem, prefix = pafs.FileSystem.from_uri(s3.uri("publish"))
    stored = filesystem.get_file_info(pafs.FileSelector(prefix, recursive=True))
    assert sorted(info.path.removeprefix(prefix + "/") for info in stored if info.type == pafs.FileType.File) == [
        "runs/r1/model.keras", "runs/r1/run.json",
    ]  # fmt: skip
    with pytest.raises(FileNotFoundError):
        reader.fetch(run_b / "missing.json")


def test_local_root_is_its_own_working_copy(tmp_path):
    storage = Storage(tmp_path / "root")
    assert not storage.remote and storage.root == tmp_path / "root"
    storage.write_json(storage.run_dir("r") / "run.json", {"ok": True})
    assert storage.fetch(storage.run_dir("r") / "run.json") == tmp_path / "root" / "runs" / "r" / "run.json"
    assert storage.uri_of(storage.run_dir("r")) == str(tmp_path / "root" / "runs" / "r")


def test_object_store_root_is_validated_before_any_work(s3, monkeypatch):
    assert RunConfig(storage=s3.uri("ok/")).validated().storage == s3.uri("ok")
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        RunConfig(storage="s3://no-such-bucket/x").validated()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ConfigError) as raised:
        RunConfig(storage=s3.uri("x")).validated()
    message = str(raised.value)
    assert message.startswith(f"storage {s3.uri('x')!r}: ") and "\n" not in message and "tapeline-secret" not in message
