"""The storage layer against a real S3-compatible server: writes that publish, fetch, list, and validation of object-store roots."""

import pyarrow.fs as pafs
import pytest

from tapeline.config import RunConfig
from tapeline.errors import ConfigError
from tapeline.storage.root import Storage


def test_a_write_is_published_as_it_commits_and_fetched_on_another_machine(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "machine-a"))
    writer = Storage(s3.uri("publish"))
    assert writer.remote and writer.root.is_relative_to(tmp_path / "machine-a")
    run = writer.layout.run("r1")
    writer.write_json(run.run_json, {"run_id": "r1"})
    with writer.atomic(run.model, suffix=".keras") as temporary:  # no publish call: committing uploads
        temporary.write_bytes(b"weights" * 1000)
    assert writer.uri_of(run.model) == s3.uri("publish") + "/runs/r1/model.keras"

    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "machine-b"))
    reader = Storage(s3.uri("publish"))
    run_b = reader.layout.run("r1")
    assert not run_b.directory.exists() and reader.exists(run_b.model)
    assert reader.read_json(run_b.run_json) == {"run_id": "r1"}
    assert reader.listdir(reader.layout.runs) == ["r1"]
    assert reader.listdir(run_b.directory) == ["model.keras", "run.json"]
    assert reader.local(writer.uri_of(run.model)).read_bytes() == b"weights" * 1000
    # Uploads pass through temporary keys and leave nothing else behind, not even directory markers.
    filesystem, prefix = pafs.FileSystem.from_uri(s3.uri("publish"))
    stored = filesystem.get_file_info(pafs.FileSelector(prefix, recursive=True))
    assert sorted(info.path.removeprefix(prefix + "/") for info in stored if info.type == pafs.FileType.File) == [
        "runs/r1/model.keras", "runs/r1/run.json",
    ]  # fmt: skip
    with pytest.raises(FileNotFoundError):
        reader.fetch(run_b.directory / "missing.json")


def test_local_root_is_its_own_working_copy(tmp_path):
    storage = Storage(tmp_path / "root")
    assert not storage.remote and storage.root == tmp_path / "root"
    storage.write_json(storage.layout.run("r").run_json, {"ok": True})
    assert storage.fetch(storage.layout.run("r").run_json) == tmp_path / "root" / "runs" / "r" / "run.json"
    assert storage.uri_of(storage.layout.run("r").directory) == str(tmp_path / "root" / "runs" / "r")


def test_object_store_root_is_validated_before_any_work(s3, monkeypatch):
    assert RunConfig(storage=s3.uri("ok/")).validated().storage == s3.uri("ok")
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        RunConfig(storage="s3://no-such-bucket/x").validated()
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ConfigError) as raised:
        RunConfig(storage=s3.uri("x")).validated()
    message = str(raised.value)
    assert message.startswith(f"storage {s3.uri('x')!r}: ") and "\n" not in message and "tapeline-secret" not in message
