"""The storage root on a real S3-compatible server (moto's, on loopback): stages, a killed export, a whole flow run."""

import signal
import sys

import duckdb
import pyarrow.fs as pafs
import pytest

from tapeline.flows.train import train_flow
from tapeline.gradients import verify
from tapeline.gradients.export import publish_gradients
from tapeline.reader import open_dataset, read_gradients, read_run_json, read_stats
from tapeline.results import TrainedModel
from tapeline.storage.root import Storage
from tests.helpers import kill_when, spawn_training, tiny_prepared


def objects(uri: str) -> list[str]:
    """Every object under `uri`, as paths relative to it."""
    filesystem, base = pafs.FileSystem.from_uri(uri)
    listing = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(info.path.removeprefix(base + "/") for info in listing if info.type == pafs.FileType.File)


def complete(uri: str) -> list[str]:
    """The snapshot objects under their final names."""
    return [name for name in objects(uri) if name.startswith("epoch=1/step-")]


def test_killed_export_leaves_the_bucket_consistent(s3, tmp_path, monkeypatch):
    """SIGKILL while snapshots stream to the bucket; another machine then exports and reads every complete one."""
    root = s3.uri(f"killed-{tmp_path.name}")
    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "trainer"))
    config, data = tiny_prepared(
        tmp_path, n_train=2000, n_test=50, storage=root, epochs=1, batch_size=16, seed=5, validation_size=100, snapshot_every=1,
        checkpoint_every=10**6,
    )  # fmt: skip
    worker = spawn_training(config, data, "killed", tmp_path)
    assert kill_when(worker, lambda: len(complete(f"{root}/runs/killed/gradients")) >= 10, poll=0.05) == -signal.SIGKILL
    stored = objects(f"{root}/runs/killed/gradients")
    published = complete(f"{root}/runs/killed/gradients")
    # An upload the kill cut short is at most a hidden temporary object at the root, outside every dataset.
    assert len(published) >= 10 and set(stored) == set(published)
    assert all(name.startswith(".") and name.endswith(".tmp") for name in objects(root) if "/" not in name)

    # Another machine: an empty working copy, nothing shared but the bucket.
    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "exporter"))
    other = Storage(root)
    variables = [f"cnn/{layer}/{kind}" for layer in ("conv", "dense", "logits") for kind in ("kernel", "bias")]
    trained = TrainedModel(
        run_id="killed", device="/CPU:0", model_uri=None, gradients_uri=f"{root}/runs/killed/gradients",
        steps_uri=f"{root}/runs/killed/steps", tensorboard_uri="", variables=variables, steps=0, resumed_from=0,
        warm_start=None, epochs=[], model={},
    )  # fmt: skip
    exported = publish_gradients(other, trained)  # reads every object under a final name; a torn one would fail
    assert len(exported.steps) == len(published)
    table = read_gradients(f"{root}/runs/killed", columns=["step", "variable", "values"])
    assert table.num_rows == len(published) * len(variables)
    assert not (tmp_path / "exporter").exists() or not list((tmp_path / "exporter").rglob("*.parquet"))  # read in place


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_api")
def test_flow_run_on_s3_storage(s3, tmp_path, monkeypatch, fashion_mnist_dir):
    root = s3.uri(f"flow-{tmp_path.name}")
    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "work"))
    manifest = train_flow(
        dataset="fashion-mnist", source=str(fashion_mnist_dir), storage=root, run_name="on-s3", epochs=1,
        train_limit=1000, validation_size=200, snapshot_every=20, snapshot_weights=True, checkpoint_every=5, keep_checkpoints=True,
    )  # fmt: skip
    run = f"{root}/runs/on-s3"
    assert read_run_json(run) == manifest and manifest["parameters"]["storage"] == root
    assert all(uri.startswith(root + "/") for uri in manifest["uris"].values()), manifest["uris"]
    stored = objects(run)
    for name in ("run.json", "model.keras", "gradients.manifest.json", "gradient_norms.png", "checkpoints/checkpoint"):
        assert name in stored
    assert any(name.startswith("tensorboard/events.out.tfevents") for name in stored)
    assert any(name.startswith("stats/epoch=1/stats-") for name in stored)
    # Checkpoints the manager dropped are gone from the bucket too: it keeps the last three.
    assert len({name.split(".")[0] for name in stored if name.startswith("checkpoints/ckpt-")}) == 3
    assert [name for name in objects(root) if name.endswith(".tmp")] == []  # every upload reached its final key
    assert read_run_json(root, "models/current")["run_id"] == "on-s3"

    # Read back from the bucket: the reader, DuckDB over the Arrow dataset, and verify.
    norms = read_gradients(run, columns=["step", "variable", "l2_norm"])
    assert norms.num_rows == len(manifest_steps := read_run_json(run, "gradients.manifest.json")["steps"]) * 6
    stats = open_dataset(run, "stats")  # noqa: F841 - DuckDB finds it by name
    largest = duckdb.sql("SELECT variable, max(max_abs) AS m, count(*) AS n FROM stats GROUP BY variable").fetchall()
    assert len(largest) == 6 and {n for _, _, n in largest} == {read_stats(run).num_rows // 6}
    assert manifest_steps[-1] == 1000 // 32 + 1
    assert verify.verify_snapshot(run)["max_relative_difference"] <= 1e-4


def test_s3_storage_without_boto3_asks_for_the_extra(s3, monkeypatch, capsys):
    """A plain install has no boto3: a run stops before any stage, and `tapeline models` at once, in one line naming the extra."""
    from tapeline.cli import main

    monkeypatch.setitem(sys.modules, "boto3", None)  # as if not installed: `import boto3` raises ImportError
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--storage", s3.uri("no-extra"), "--epochs", "1"])
    error = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(error) == 1 and "pip install 'tapeline[s3]'" in error[0]
    assert objects(s3.uri("no-extra")) == []
    assert main(["models", s3.uri("no-extra")]) == 2  # the champion pointer is read with boto3 too
    assert capsys.readouterr().err == "tapeline models: error: S3 storage needs the s3 extra: pip install 'tapeline[s3]'\n"
