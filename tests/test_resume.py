"""Checkpoints, resume after SIGKILL, determinism and non-finite values: real processes, tiny data."""

import dataclasses
import signal
from pathlib import Path

import duckdb
import keras
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tapeline.errors import ConfigError, NonFiniteError
from tapeline.gradients.export import publish_gradients
from tapeline.gradients.writers import snapshot_file
from tapeline.reader import read_gradients, read_steps
from tapeline.results import TrainedModel
from tapeline.storage.root import Storage
from tapeline.training.loop import train_model
from tests.helpers import kill_when, spawn_training, tiny_prepared
from tests.readers import PARTITIONED, assert_every_reader_agrees, read_by_every_reader


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return tiny_prepared(
        root, n_train=2000, n_test=50, epochs=2, batch_size=16, seed=5, validation_size=100, snapshot_every=40, checkpoint_every=20,
        deterministic=True,
    )  # fmt: skip


def weights(trained) -> list[np.ndarray]:
    return [v.numpy() for v in keras.models.load_model(trained.model_uri, safe_mode=True).trainable_variables]


def data_files(directory: Path) -> list[str]:
    """The complete Parquet files of a dataset, as paths relative to it (epoch=<N>/name), in step order."""
    return sorted((p.relative_to(directory).as_posix() for p in directory.glob("epoch=*/[!.]*.parquet")), key=lambda f: f.split("/")[1])


def latest_checkpoint_step(run_dir: Path) -> int:
    state = run_dir / "checkpoints" / "checkpoint"
    if not state.exists():
        return 0
    line = state.read_text().splitlines()[0]  # model_checkpoint_path: "ckpt-40"
    return int(line.rsplit("-", 1)[1].rstrip('"'))


@pytest.fixture(scope="module")
def uninterrupted(setup):
    config, data = setup
    return train_model(config, data, "straight")


def test_same_seed_same_weights_and_gradients(setup, uninterrupted):
    config, data = setup
    again = train_model(config, data, "straight-again")
    for a, b in zip(weights(uninterrupted), weights(again)):
        assert np.array_equal(a, b)
    for epoch, step in ((1, 1), (2, uninterrupted.steps)):
        first = pq.read_table(snapshot_file(Path(uninterrupted.gradients_uri), epoch, step)).drop(["run_id"])
        second = pq.read_table(snapshot_file(Path(again.gradients_uri), epoch, step)).drop(["run_id"])
        assert first.equals(second)


def test_killed_training_resumes_and_matches(setup, uninterrupted, tmp_path):
    config, data = setup
    run_dir = Storage(config.storage).layout.run("killed").directory
    worker = spawn_training(config, data, "killed", tmp_path)
    steps_per_epoch = int(np.ceil(data.counts["train"] / config.batch_size))
    status = kill_when(worker, lambda: latest_checkpoint_step(run_dir) >= 60)  # mid-epoch: 119 steps per epoch
    killed_at = latest_checkpoint_step(run_dir)
    assert status == -signal.SIGKILL and 60 <= killed_at < 2 * steps_per_epoch

    resumed = train_model(config, data, "killed")
    assert resumed.resumed_from >= killed_at and resumed.steps == uninterrupted.steps
    for a, b in zip(weights(uninterrupted), weights(resumed)):
        assert np.array_equal(a, b)
    # The step table has every step exactly once, as if nothing had happened: the
    # resumed run rewrote the same files, in the same epoch directories.
    steps = read_steps(run_dir).sort_by("step")
    assert steps.column("step").to_pylist() == list(range(1, resumed.steps + 1))
    expected = read_steps(Path(uninterrupted.steps_uri).parent).sort_by("step")
    assert steps.select(["epoch", "loss"]).equals(expected.select(["epoch", "loss"]))
    for name in ("steps", "stats"):
        assert data_files(run_dir / name) == data_files(Path(uninterrupted.steps_uri).parent / name)
    assert [e["epoch"] for e in resumed.epochs] == [1, 2]


class Stop(Exception):
    pass


def test_resumed_at_a_call_boundary_with_other_call_lengths_matches(setup, uninterrupted):
    """Stopped after the checkpoint of step 60 (calls of 7 steps end there), resumed in calls of 13: bit-identical."""
    config, data = setup

    def stop_after(step, last_step, loss):
        if step == 61:
            raise Stop

    with pytest.raises(Stop):
        train_model(dataclasses.replace(config, steps_per_call=7), data, "boundary", on_progress=stop_after)
    resumed = train_model(dataclasses.replace(config, steps_per_call=13), data, "boundary")
    assert resumed.resumed_from == 60 and resumed.steps == uninterrupted.steps
    for a, b in zip(weights(uninterrupted), weights(resumed)):
        assert np.array_equal(a, b)
    run_dir, expected = Storage(config.storage).layout.run("boundary").directory, Path(uninterrupted.steps_uri).parent
    assert (
        read_steps(run_dir)
        .sort_by("step")
        .select(["step", "loss", "global_norm"])
        .equals(read_steps(expected).sort_by("step").select(["step", "loss", "global_norm"]))
    )


def test_killed_while_a_checkpoint_is_written_resumes(setup, uninterrupted, tmp_path):
    """SIGKILL while the background thread writes a checkpoint (its temporary files on disk): the index names a
    complete one, and the run resumes from it to the same weights, and removes what the killed save left."""
    config, data = dataclasses.replace(setup[0], checkpoint_every=1), setup[1]  # a write nearly always in flight
    run_dir = Storage(config.storage).layout.run("killed-writing").directory
    worker = spawn_training(config, data, "killed-writing", tmp_path)

    def writing() -> list[str]:
        if latest_checkpoint_step(run_dir) < 30:
            return []
        return [p.name for p in (run_dir / "checkpoints").iterdir() if "_temp" in p.name]

    assert kill_when(worker, writing, poll=0) == -signal.SIGKILL and writing()
    killed_at = latest_checkpoint_step(run_dir)
    resumed = train_model(setup[0], data, "killed-writing")  # a checkpoint every 20 steps again: how often is no resume parameter
    assert resumed.resumed_from >= killed_at >= 30 and resumed.steps == uninterrupted.steps
    for a, b in zip(weights(uninterrupted), weights(resumed)):
        assert np.array_equal(a, b)
    assert not [p.name for p in (run_dir / "checkpoints").iterdir() if "_temp" in p.name or ".tmp" in p.name]  # nothing of the killed save


def test_resuming_with_other_parameters_is_refused(setup, uninterrupted):
    config, data = setup
    with pytest.raises(ConfigError, match="learning_rate"):
        train_model(dataclasses.replace(config, learning_rate=0.5), data, "straight")


@pytest.mark.parametrize("checkpoint_every", [1, 10**6])
def test_non_finite_stops_with_the_step_and_keeps_its_gradients(setup, checkpoint_every):
    config, data = setup
    config = dataclasses.replace(config, learning_rate=1e10, checkpoint_every=checkpoint_every, epochs=1)
    with pytest.raises(NonFiniteError, match=r"non-finite values at step \d+ \(epoch 1\) in .*cnn/") as raised:
        train_model(config, data, f"explodes-{checkpoint_every}")
    trained = raised.value.trained
    exported = publish_gradients(Storage(config.storage), trained)
    assert exported.steps[-1] == trained.steps
    assert exported.anomalies[-1]["step"] == trained.steps and "non-finite" in exported.anomalies[-1]["reason"]
    # The message names the checkpoint on disk, or says there is none (with checkpoint_every 10**6 there is none yet).
    kept = latest_checkpoint_step(Storage(config.storage).layout.run(trained.run_id).directory)
    assert kept == (trained.steps - 1 if checkpoint_every == 1 else 0)
    expected = f"the last good checkpoint is step {kept}," if kept else "no checkpoint was written yet,"
    assert expected in str(raised.value)
    last = pq.read_table(snapshot_file(Path(trained.gradients_uri), 1, trained.steps))
    assert not all(np.isfinite(np.concatenate(last.column("values").to_pylist())))


def test_a_non_finite_step_inside_a_call_ends_it_there(setup):
    """Divergence at step 4, inside the call of steps 2..51: that step's gradients are written, no later step's,
    and the run records exactly what it records one step per call."""
    config, data = setup
    config = dataclasses.replace(config, learning_rate=1e10, snapshot_every=10**6, checkpoint_every=10**6, epochs=1)
    runs = {}
    for k in (50, 1):
        with pytest.raises(NonFiniteError, match=r"non-finite values at step 4 \(epoch 1\)") as raised:
            train_model(dataclasses.replace(config, steps_per_call=k), data, f"explodes-in-call-{k}")
        trained = raised.value.trained
        run_dir = Storage(config.storage).layout.run(trained.run_id).directory
        kept = pq.read_table(run_dir / "gradients", columns=["step", "reason", "values"])
        runs[k] = read_steps(run_dir).select(["step", "loss", "global_norm", "sample_ids"]), kept
        assert trained.steps == 4 and read_steps(run_dir).column("step").to_pylist() == [1, 2, 3, 4]
        assert sorted(set(kept.column("step").to_pylist())) == [1, 4]
        failing = kept.filter(pc.equal(kept.column("step"), 4))
        assert set(failing.column("reason").to_pylist()) == {"non-finite"}
        assert not all(np.isfinite(np.concatenate(failing.column("values").to_pylist())))
    assert repr(runs[50][0].to_pylist()) == repr(runs[1][0].to_pylist())  # by repr: the last loss is NaN


def test_killed_while_writing_snapshots_leaves_a_readable_dataset(setup, tmp_path):
    """SIGKILL during a stream of snapshot writes: every file under a final name is whole, and pyarrow,
    DuckDB and Polars read each dataset directory as it is, while training writes and after the kill."""
    config, data = dataclasses.replace(setup[0], snapshot_every=1, checkpoint_every=10), setup[1]
    run_dir = Storage(config.storage).layout.run("killed-export").directory
    worker = spawn_training(config, data, "killed-export", tmp_path)
    reads = []

    def read_while_written() -> bool:
        if data_files(run_dir / "stats"):  # every dataset has a file by now; the writers go on
            for name in PARTITIONED:  # rows change between readers here: each must just read
                assert all(rows > 0 for rows, _ in read_by_every_reader(str(run_dir / name)).values())
            reads.append(name)
        return len(data_files(run_dir / "gradients")) >= 20

    status = kill_when(worker, read_while_written)
    files = [run_dir / "gradients" / name for name in data_files(run_dir / "gradients")]
    assert status == -signal.SIGKILL and len(files) >= 20 and reads
    variables = pq.read_table(files[0]).column("variable").to_pylist()
    trained = TrainedModel(
        run_id="killed-export", device="/CPU:0", model_uri=None, gradients_uri=str(run_dir / "gradients"),
        steps_uri=str(run_dir / "steps"), tensorboard_uri="", variables=variables, steps=0, resumed_from=0, warm_start=None, epochs=[], model={},
    )  # fmt: skip
    exported = publish_gradients(Storage(config.storage), trained)  # reads every complete file; would fail on a torn one
    assert exported.steps == [int(f.stem.split("-")[1]) for f in files]
    table = read_gradients(run_dir, columns=["step", "variable", "values"])
    assert table.num_rows == len(files) * len(variables)
    # Any tool reading the complete files, by directory or by glob, skips what the kill left half-written,
    # which is never inside a dataset directory.
    count = duckdb.sql(f"SELECT count(*) FROM read_parquet('{run_dir}/gradients/**/*.parquet')").fetchall()[0][0]
    assert count == table.num_rows
    assert not [path for name in PARTITIONED for path in (run_dir / name).rglob(".*")]
    assert assert_every_reader_agrees(str(run_dir / "gradients")) == table.num_rows
    assert assert_every_reader_agrees(str(run_dir / "steps")) == read_steps(run_dir).num_rows > 0
    assert_every_reader_agrees(str(run_dir / "stats"))
