"""The storage layout (one owner of every name under a root) and the one way to write, which publishes as it commits."""

import subprocess
import sys
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from tapeline.storage.layout import Layout, RunPaths, locate_run
from tapeline.storage.root import Storage

RUN_FILES = {
    "run_json": "run.json", "model": "model.keras", "model_card": "model.json", "gradients": "gradients",
    "gradients_manifest": "gradients.manifest.json", "steps": "steps", "stats": "stats", "checkpoints": "checkpoints",
    "tensorboard": "tensorboard", "norm_plot": "gradient_norms.png", "hardest_plot": "hardest_examples.png",
    "noise_plot": "noise_scale.png", "cluster_job": "cluster.json", "lease": ".lease", "deleting": ".deleting",
    "checkpoint_index": "checkpoints/checkpoint",
}  # fmt: skip


def stored(uri: str) -> list[str]:
    """Every object under `uri`, relative to it."""
    filesystem, base = pafs.FileSystem.from_uri(uri)
    listing = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(info.path.removeprefix(base + "/") for info in listing if info.type == pafs.FileType.File)


def test_layout_names_every_place_under_the_root(tmp_path):
    layout = Storage(tmp_path).layout
    run = layout.run("r1")
    assert run.directory == tmp_path / "runs" / "r1" and run.run_id == "r1"
    assert {name: getattr(run, name).relative_to(run.directory).as_posix() for name in RUN_FILES} == RUN_FILES
    assert layout.runs == tmp_path / "runs" and layout.champion == tmp_path / "models" / "current"
    assert layout.cache == tmp_path / "cache" and layout.datasets == tmp_path / "datasets"
    assert layout.cache_file("mnist", "ab12") == tmp_path / "cache" / "mnist" / "ab12.gz"
    prepared = layout.dataset("mnist", "k1")
    assert prepared.directory == tmp_path / "datasets" / "mnist" / "k1"
    assert prepared.manifest == tmp_path / "datasets" / "mnist" / "k1.manifest.json"  # beside the directory
    assert prepared.split("train") == prepared.directory / "train.parquet"
    assert prepared.deleting == tmp_path / "datasets" / "mnist" / "k1.deleting"


@pytest.mark.parametrize("given", ["{run}", "{run}/", "{run}/run.json"])
def test_a_run_is_located_by_its_directory_or_its_run_json(tmp_path, given):
    run = Layout(tmp_path).run("r1").directory
    filesystem, paths = locate_run(given.format(run=run))
    assert isinstance(filesystem, pafs.LocalFileSystem) and paths == RunPaths(run)


def test_a_run_in_an_object_store_is_located_there(s3):
    filesystem, paths = locate_run(f"{s3.uri('located')}/runs/r1/run.json")
    assert isinstance(filesystem, pafs.S3FileSystem)
    assert paths.gradients_manifest == PurePosixPath(pafs.FileSystem.from_uri(s3.uri("located"))[1], "runs/r1/gradients.manifest.json")


def test_reading_gradients_imports_neither_prefect_nor_tensorflow_nor_the_run_parameters():
    probe = "import sys; from tapeline.reader import read_gradients; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    heavy = [name for name in loaded if name.split(".")[0] in ("prefect", "tensorflow", "keras", "matplotlib", "pydantic")]
    assert "tapeline.reader" in loaded and heavy == [] and "tapeline.config" not in loaded
    packages = {"tapeline", "tapeline.gradients", "tapeline.storage"}
    assert sorted(set(name for name in loaded if name.startswith("tapeline.")) - packages - {"tapeline.reader"}) == [
        "tapeline.errors",
        "tapeline.gradients.schema",
        "tapeline.storage.layout",
    ]


def test_every_write_on_an_object_store_root_is_published_without_a_publish_call(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "writer"))
    root = s3.uri("writes")
    storage = Storage(root)
    run = storage.layout.run("r1")
    with storage.atomic(run.norm_plot) as temporary:
        temporary.write_bytes(b"png")
    storage.write_json(run.run_json, {"run_id": "r1"})
    table = pa.table({"step": pa.array([1], pa.int64())})
    storage.write_table(run.stats / "epoch=1" / "stats-000000001.parquet", table, dataset=run.stats)
    events = run.tensorboard / "events.out.tfevents"
    events.parent.mkdir(parents=True)
    with storage.publishing(run.tensorboard):  # files a library writes itself: uploaded when the block ends
        events.write_bytes(b"epoch 1")
    with events.open("ab") as handle:  # a background flush, before the next block
        handle.write(b", epoch 2")
    with storage.publishing(run.tensorboard):
        pass  # this block's flush found nothing left to write
    assert stored(root) == [
        "runs/r1/gradient_norms.png", "runs/r1/run.json", "runs/r1/stats/epoch=1/stats-000000001.parquet",
        "runs/r1/tensorboard/events.out.tfevents",
    ]  # fmt: skip

    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "another-machine"))
    other = Storage(root)
    assert other.read_json(other.layout.run("r1").run_json) == {"run_id": "r1"}
    assert other.local(storage.uri_of(run.norm_plot)).read_bytes() == b"png"
    assert other.local(storage.uri_of(events)).read_bytes() == b"epoch 1, epoch 2"


def test_a_failed_write_leaves_nothing_anywhere(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "writer"))
    root = s3.uri("failed-writes")
    storage = Storage(root)
    run = storage.layout.run("r1")
    with pytest.raises(RuntimeError, match="killed"), storage.atomic(run.model, suffix=".keras") as temporary:
        temporary.write_bytes(b"half a model")
        raise RuntimeError("killed")
    assert stored(root) == [] and [p for p in storage.root.rglob("*") if p.is_file()] == []
