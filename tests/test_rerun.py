"""A completed run is history: rerunning its name reports it, or is refused; its files are never written again."""

import hashlib
import json

import pyarrow.fs as pafs
import pytest

from tapeline.cli import main
from tapeline.config import RunConfig, run_identity
from tapeline.flows.train import train_flow
from tapeline.storage.root import Storage
from tests.helpers import holder_process, tiny_arrays, write_own_dir

pytestmark = pytest.mark.usefixtures("prefect_api")

RUN = ["--run-name", "r1", "--validation-size", "50", "--steps-per-call", "4", "--snapshot-every", "4"]


def snapshot(root: str) -> dict[str, tuple]:
    """Every file of the storage root but the run's lease: its size, modification time and, for the model and the
    champion pointer, its SHA-256."""
    filesystem, base = pafs.FileSystem.from_uri(root) if "://" in root else (pafs.LocalFileSystem(), root)
    listing = filesystem.get_file_info(pafs.FileSelector(base, recursive=True))
    files = {info.path.removeprefix(base + "/"): info for info in listing if info.type == pafs.FileType.File}
    files.pop("runs/r1/.lease", None)  # the holder's, below

    def digest(name: str) -> str:
        with filesystem.open_input_stream(f"{base}/{name}") as stream:
            return hashlib.sha256(stream.read()).hexdigest()

    return {name: (info.size, info.mtime_ns, digest(name) if name in ("runs/r1/model.keras", "models/current") else None)
            for name, info in files.items()}  # fmt: skip


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_champions_name_rerun_reports_it_or_is_refused_and_writes_nothing(where, tmp_path, request, monkeypatch, capsys, flow_log):
    """The champion r1; `--run-name r1` again with its parameters, then with `--epochs 3 --promotion-margin 0.5`."""
    own = tmp_path / "own"
    write_own_dir(own, tiny_arrays())
    root = str(tmp_path / "store") if where == "local" else request.getfixturevalue("s3").uri(f"rerun-{tmp_path.name}")
    monkeypatch.setenv("TAPELINE_WORKDIR", str(tmp_path / "work"))
    data = ["--dataset", "idx", "--source", str(own)]
    assert main(["train", *data, "--storage", root, *RUN, "--epochs", "1"]) == 0, capsys.readouterr().err
    run_json = capsys.readouterr().out.splitlines()[-1]
    storage = Storage(root)
    manifest = storage.read_json(storage.layout.run("r1").run_json)
    assert manifest["promotion"]["promoted"] and run_json == storage.uri_of(storage.layout.run("r1").run_json)
    before = snapshot(root)

    # Another process holds the run's lease: a rerun that took it would fail with "is being written".
    holder = holder_process(root, "r1")
    try:
        # The same run: defaults given explicitly, the storage as $TAPELINE_STORAGE, the source as a relative path.
        monkeypatch.setenv("TAPELINE_STORAGE", root)
        monkeypatch.chdir(tmp_path)
        same = ["--dataset", "idx", "--source", "own", *RUN, "--epochs", "1", "--batch-size", "32", "--promotion-margin", "0"]
        assert main(["train", *same]) == 0
        out, err = capsys.readouterr()
        assert out.splitlines()[-1] == run_json and "Traceback" not in out + err
        assert f"run 'r1' is complete (finished {manifest['finished']}): nothing trained or written" in flow_log
        assert snapshot(root) == before

        assert main(["train", *data, "--storage", root, *RUN, "--epochs", "3", "--promotion-margin", "0.5"]) == 2
        err = capsys.readouterr().err
        assert err.splitlines()[-1] == (
            "tapeline train: error: run 'r1' is complete with epochs=1, promotion_margin=0.0; "
            "this call has epochs=3, promotion_margin=0.5: choose another --run-name"
        ), err
        assert snapshot(root) == before
    finally:
        holder.kill()
        holder.wait()

    # A retried flow run is the same call again: the flow returns the manifest it wrote, and writes nothing.
    parameters = {"dataset": "idx", "source": str(own), "storage": root, "run_name": "r1", "epochs": 1, "validation_size": 50,
                  "steps_per_call": 4, "snapshot_every": 4}  # fmt: skip
    assert train_flow(**parameters) == manifest
    assert snapshot(root) == before


def test_what_makes_a_run_what_it_is(tmp_path):
    """Where its files go and how its data is fetched do not count; a parameter a run.json predates is its default."""
    config = RunConfig(storage=str(tmp_path), run_name="r1", epochs=2).validated()
    recorded = json.loads(json.dumps(config.parameters()))  # as run.json holds them
    del recorded["warm_start_from"]  # recorded before the parameter existed
    elsewhere = RunConfig(storage=str(tmp_path / "moved"), run_name="r1", epochs=2, refresh=True, source="https://mirror.example/")
    assert run_identity(recorded) == run_identity(elsewhere.validated().parameters())
    assert "source" not in run_identity(recorded) and "epochs" in run_identity(recorded)
    own = tmp_path / "own"
    write_own_dir(own, tiny_arrays())
    own_run = RunConfig(dataset="idx", source=str(own), storage=str(tmp_path), validation_size=50).validated()
    assert run_identity(own_run.parameters())["source"] == str(own)
