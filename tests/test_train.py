"""Training and gradient export on a tiny dataset: real TensorFlow, real Parquet, small budget."""

import dataclasses
import json
import re
from pathlib import Path

import duckdb
import keras
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from tapeline.data.splits import read_split
from tapeline.gradients.export import GradientExportError, plot_norms, publish_gradients
from tapeline.gradients.recorder import SnapshotPolicy
from tapeline.gradients.schema import GRADIENT_SCHEMA, PARTITIONING, STAT_NAMES, STATS_SCHEMA, file_schema, step_schema
from tapeline.gradients.writers import atomic_partition_path, partition_file, snapshot_file
from tapeline.model import build_model
from tapeline.reader import NoGradientsError, gradient_arrays, read_gradients, read_stats, read_steps
from tapeline.registry.promotion import promote_if_better
from tapeline.registry.warm_start import choose_warm_start
from tapeline.storage.root import Storage
from tapeline.training.calls import AnomalyWatch, call_length
from tapeline.training.loop import train_model
from tests.readers import PARTITIONED, assert_every_reader_agrees

EPOCHS, BATCH, SNAPSHOT_EVERY = 2, 32, 3


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.helpers import tiny_prepared

    root = tmp_path_factory.mktemp("train")
    config, data = tiny_prepared(root, epochs=EPOCHS, batch_size=BATCH, seed=3, validation_size=40, snapshot_every=SNAPSHOT_EVERY)
    return config, data, train_model(config, data, "run-1")


class WriterStopped(Exception):
    """Ends a write a test holds open, the way a failing writer does: its temporary file is removed, never renamed."""


def run_dir(result) -> Path:
    return Path(result.model_uri).parent


def epoch_of(step: int, data) -> int:
    return (step - 1) // int(np.ceil(data.counts["train"] / BATCH)) + 1


def test_datasets_are_hive_partitioned_by_epoch(trained):
    """`epoch` is the directory's, never a file's: pyarrow refuses a dataset that has both."""
    config, data, result = trained
    for name, schema, prefix in (("gradients", GRADIENT_SCHEMA, "step"), ("steps", step_schema(), "steps"), ("stats", STATS_SCHEMA, "stats")):
        directory = run_dir(result) / name
        files = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*.parquet"))
        assert files and all(re.fullmatch(rf"epoch=[12]/{prefix}-\d{{9}}\.parquet", f) for f in files), files
        assert {f.split("/")[0] for f in files} == {"epoch=1", "epoch=2"}
        for f in files:
            assert pq.read_schema(directory / f).equals(file_schema(schema)), f
        table = pq.read_table(directory, partitioning=PARTITIONING)  # as any hive-aware reader sees it
        assert table.select(schema.names).schema.equals(schema)
        assert table.column("epoch").to_pylist() == [epoch_of(s, data) for s in table.column("step").to_pylist()]


def test_duckdb_reads_the_stats_with_a_plain_select(trained):
    config, data, result = trained
    being_written = partition_file(run_dir(result) / "stats", 1, "stats-000000999.parquet")
    with pytest.raises(WriterStopped), atomic_partition_path(being_written) as partial:
        partial.write_bytes(b"PAR1 half a file")  # what a writer has written so far, or a killed one left
        rows = duckdb.sql(
            f"SELECT step, epoch, variable, l2_norm FROM read_parquet('{run_dir(result)}/stats/**/*.parquet', hive_partitioning = true) ORDER BY step, variable"
        ).fetchall()
        for name in PARTITIONED:  # and every other reader, of every dataset
            assert_every_reader_agrees(str(run_dir(result) / name))
        raise WriterStopped  # so the partial file is never renamed into place
    assert len(rows) == result.steps * len(result.variables)
    assert all(epoch == epoch_of(step, data) for step, epoch, _, _ in rows)
    expected = read_stats(run_dir(result), columns=["step", "variable", "l2_norm"]).sort_by([("step", "ascending"), ("variable", "ascending")])
    assert [(s, v, n) for s, _, v, n in rows] == [tuple(r.values()) for r in expected.to_pylist()]


def test_snapshots_hold_every_variable_at_the_right_steps(trained):
    config, data, result = trained
    steps_per_epoch = int(np.ceil(data.counts["train"] / BATCH))
    assert result.steps == EPOCHS * steps_per_epoch
    table = pq.read_table(result.gradients_uri, partitioning=PARTITIONING).select(GRADIENT_SCHEMA.names)
    assert table.schema.equals(GRADIENT_SCHEMA)
    expected = {1, result.steps} | set(range(SNAPSHOT_EVERY, result.steps + 1, SNAPSHOT_EVERY))
    kept = {row["step"]: row["reason"] for row in table.select(["step", "reason"]).to_pylist()}
    assert expected <= set(kept) and kept[1] == "first" and "last" in kept[result.steps]
    assert all(kept[step] == "norm-spike" for step in set(kept) - expected)
    model = build_model()
    for step in kept:
        rows = table.filter(pc.equal(table.column("step"), step))
        assert rows.column("variable").to_pylist() == [v.path for v in model.trainable_variables]
        for row in rows.to_pylist():
            assert int(np.prod(row["shape"])) == len(row["values"])
            assert row["l2_norm"] == pytest.approx(np.linalg.norm(row["values"]), rel=1e-5)
            assert row["run_id"] == "run-1" and row["epoch"] == epoch_of(step, data)


def test_first_snapshot_is_exactly_tape_gradient(trained):
    """Recompute step 1 from the seeded initial weights and the recorded batch."""
    config, data, result = trained
    steps = read_steps(run_dir(result), steps=[1])
    assert steps.schema.equals(step_schema())
    batch_ids = steps.column("sample_ids")[0].as_py()
    images, labels, sample_ids = read_split(data.uris["train"])
    position = {sid: i for i, sid in enumerate(sample_ids)}
    rows = [position[sid] for sid in batch_ids]

    keras.utils.set_random_seed(config.seed)
    model = build_model(seed=config.seed)
    with tf.GradientTape() as tape:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels[rows], model(images[rows], training=True))
    expected = tape.gradient(loss, model.trainable_variables)

    snapshot = pq.read_table(snapshot_file(Path(result.gradients_uri), 1, 1)).to_pylist()
    assert steps.column("loss")[0].as_py() == pytest.approx(float(loss), rel=1e-5)
    for row, gradient in zip(snapshot, expected):
        np.testing.assert_allclose(np.reshape(row["values"], row["shape"]), gradient.numpy(), rtol=1e-4, atol=1e-7)


def test_step_table_covers_every_step_with_real_sample_ids(trained):
    config, data, result = trained
    steps = read_steps(run_dir(result)).sort_by("step")
    assert steps.column("step").to_pylist() == list(range(1, result.steps + 1))
    _, _, train_ids = read_split(data.uris["train"])
    for epoch in range(1, EPOCHS + 1):
        epoch_rows = steps.filter(pc.equal(steps.column("epoch"), epoch))
        seen = [sid for ids in epoch_rows.column("sample_ids").to_pylist() for sid in ids]
        assert sorted(seen) == sorted(train_ids)  # each training sample once per epoch


def test_metrics_and_model(trained):
    config, data, result = trained
    assert [row["epoch"] for row in result.epochs] == [1, 2]
    assert result.epochs[-1]["train_accuracy"] > 0.5  # the toy classes are easy
    assert all(row["train_samples_per_second"] > 0 for row in result.epochs)
    model = keras.models.load_model(result.model_uri, safe_mode=True)
    images, _, _ = read_split(data.uris["test"])
    assert model.predict(images[:4], verbose=0).shape == (4, 10)


def test_publish_writes_a_manifest_and_ignores_partial_files(trained):
    config, data, result = trained
    directory = Path(result.gradients_uri)
    with pytest.raises(WriterStopped), atomic_partition_path(snapshot_file(directory, 1, 999)) as partial:
        partial.write_bytes(b"PAR1 half a file")
        first = publish_gradients(Storage(config.storage), result)
        second = publish_gradients(Storage(config.storage), result)  # exporting twice is harmless
        raise WriterStopped
    assert first == second
    assert Path(first.manifest_uri) == directory.with_name("gradients.manifest.json")  # beside the dataset, not in it
    manifest = json.loads(Path(first.manifest_uri).read_text())
    assert [f["path"] for f in manifest["files"]] == [f"epoch={epoch_of(s, data)}/step-{s:09d}.parquet" for s in first.steps]
    assert [v["variable"] for v in first.variables] == result.variables
    assert all(v["max_l2_norm"] >= v["mean_l2_norm"] > 0 for v in first.variables)


@pytest.mark.parametrize(
    "name, content, error",
    [
        ("epoch=1/step-000999999.parquet", "a steps file", "not the gradient schema"),
        ("epoch=1/step-000999999.parquet", "a snapshot with an epoch column", "not the gradient schema"),
        ("step-000999999.parquet", "a snapshot", r"not in an epoch=<N> directory"),
        ("epoch=one/step-000999999.parquet", "a snapshot", r"not in an epoch=<N> directory"),
    ],
)
def test_publish_rejects_a_foreign_file(trained, name, content, error):
    config, data, result = trained
    directory = Path(result.gradients_uri)
    snapshot = pq.read_table(snapshot_file(directory, 1, 1))
    table = {
        "a steps file": read_steps(run_dir(result)),
        "a snapshot with an epoch column": snapshot.add_column(1, "epoch", pa.array([1] * snapshot.num_rows, pa.int32())),
        "a snapshot": snapshot,
    }[content]
    foreign = directory / name
    foreign.parent.mkdir(exist_ok=True)
    pq.write_table(table, foreign)
    try:
        with pytest.raises(GradientExportError, match=error):
            publish_gradients(Storage(config.storage), result)
    finally:
        foreign.unlink()
        if foreign.parent.name == "epoch=one":
            foreign.parent.rmdir()


def test_saved_model_predicts_exactly_what_training_left(trained):
    """The final checkpoint holds the trained weights; the .keras file must predict exactly as they do."""
    config, data, result = trained
    model = build_model()
    checkpoint_dir = Path(result.model_uri).parent / "checkpoints"
    tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(str(checkpoint_dir))).expect_partial()
    saved = keras.models.load_model(result.model_uri, safe_mode=True)
    images, _, _ = read_split(data.uris["test"])
    np.testing.assert_array_equal(saved.predict(images, verbose=0), model.predict(images, verbose=0))


def test_every_step_is_summarised_in_stats(trained):
    config, data, result = trained
    stats = read_stats(run_dir(result))
    assert stats.schema.equals(STATS_SCHEMA)
    assert stats.num_rows == result.steps * len(result.variables)
    snapshots = pq.read_table(result.gradients_uri, columns=["step", "variable", "values"]).to_pylist()
    by_key = {(r["step"], r["variable"]): r for r in stats.to_pylist()}
    for snapshot in snapshots:
        row, values = by_key[(snapshot["step"], snapshot["variable"])], np.asarray(snapshot["values"], np.float64)
        assert row["l2_norm"] == pytest.approx(np.linalg.norm(values), rel=1e-4)
        assert row["mean"] == pytest.approx(values.mean(), rel=1e-3, abs=1e-7)
        assert row["std"] == pytest.approx(values.std(), rel=1e-3, abs=1e-6)
        assert row["max_abs"] == pytest.approx(np.abs(values).max(), rel=1e-6)
        assert row["zero_fraction"] == pytest.approx(np.mean(values == 0), abs=1e-6)
        assert row["nan_count"] == row["inf_count"] == 0
    steps = read_steps(run_dir(result)).to_pandas()
    first = stats.filter(pc.equal(stats.column("step"), 1)).column("l2_norm").to_numpy()
    assert steps.loc[steps.step == 1, "global_norm"].item() == pytest.approx(np.linalg.norm(first), rel=1e-5)
    assert np.allclose(steps.learning_rate, config.learning_rate)


def test_snapshot_policy_keeps_spikes_and_non_finite_steps():
    policy = SnapshotPolicy(every=100, last_step=1000, spike_factor=10)
    reasons = [policy.reason(step, 1.0, True) for step in range(1, 51)]
    assert reasons[0] == "first" and not any(reasons[1:])
    assert policy.reason(51, 9.0, True) == ""
    assert policy.reason(52, 11.0, True) == "norm-spike"
    assert policy.reason(100, float("nan"), False) == "scheduled,non-finite"
    assert policy.reason(1000, 1.0, True) == "scheduled,last"


def test_the_device_ends_a_call_exactly_where_the_policy_keeps_an_anomaly():
    """AnomalyWatch (on the device) and SnapshotPolicy (on the host) see the same norms and agree on every step."""
    policy, watch = SnapshotPolicy(every=10**6, last_step=10**6, spike_factor=3), AnomalyWatch(spike_factor=3, loss_scaled=False)
    rng = np.random.default_rng(0)
    norms = list(rng.uniform(1, 2, 150)) + [7.0, 5.9, float("inf"), 1.5, 6.1] + list(rng.uniform(1, 2, 20))
    spikes = 0
    for step, norm in enumerate(norms, 2):
        stats = np.zeros([2, len(STAT_NAMES)], np.float32)
        stats[0, 0], stats[0, -2] = norm, float(not np.isfinite(norm))  # the l2 norm and a NaN count
        device_norm, stop = watch(tf.constant(1.0), tf.constant(stats))
        finite = bool(np.isfinite(norm))
        reason = policy.reason(step, float(device_norm), finite)
        assert bool(stop) == (not finite or "norm-spike" in reason), step
        spikes += "norm-spike" in reason
    assert spikes == 3  # 7.0, 5.9 and 6.1 against a median near 1.5


def test_calls_end_where_the_host_acts():
    policy = SnapshotPolicy(every=10, last_step=95, spike_factor=10)
    plan = {weights: [call_length(s, 8, 40, 25, policy, weights) for s in (0, 1, 5, 9, 18, 24, 30)] for weights in (False, True)}
    # after step: 0 -> the first step alone; 1 -> up to 8 more; 5 -> to the scheduled 10; 18 -> to 20; 24 -> the checkpoint at 25;
    # 30 -> 8 more, up to the epoch's end at 40 at most. With weights, a scheduled step starts its own call.
    assert plan[False] == [1, 8, 5, 1, 2, 1, 8]
    assert plan[True] == [1, 8, 4, 1, 1, 1, 8]


def test_reader_trusts_only_the_manifest(trained, tmp_path):
    config, data, result = trained
    run = Path(result.model_uri).parent
    publish_gradients(Storage(config.storage), result)
    table = read_gradients(run, variables=["cnn/conv/bias"], steps=[1], columns=["step", "variable", "values"])
    assert table.num_rows == 1 and len(table.column("values")[0]) == 32
    assert gradient_arrays(run, 1)["cnn/conv/kernel"].shape == (3, 3, 1, 32)
    last = read_gradients(run, steps=[result.steps])  # every column, in schema order, epoch from the directory
    assert last.schema.equals(GRADIENT_SCHEMA) and set(last.column("epoch").to_pylist()) == {EPOCHS}
    with pytest.raises(NoGradientsError, match="has no published gradients"):
        read_gradients(tmp_path)
    with pytest.raises(NoGradientsError, match="no weights"):
        gradient_arrays(run, 1, field="weights")


def test_norm_plot_is_a_small_png_under_the_run(trained):
    config, data, result = trained
    png = plot_norms(Storage(config.storage), result.run_id)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 100_000
    assert (Path(config.storage) / "runs" / result.run_id / "gradient_norms.png").read_bytes() == png


def test_warm_start_begins_at_the_champions_weights(trained):
    config, data, result = trained
    storage = Storage(config.storage)
    promote_if_better(storage, result.run_id, config.dataset, "tiny-test", result.model_uri, 0.5, margin=0.0, train_set="tiny-train")
    choice = choose_warm_start(storage, warm_start=True, warm_start_from=None, variables=[])
    assert choice.record("other-train") == {  # a champion trained on other data is no start
        "from": None, "model": None, "reason": f"the champion, run {result.run_id}, was trained on other training data",
    }  # fmt: skip
    record = choice.record("tiny-train")
    assert record == {"from": result.run_id, "model": result.model_uri, "reason": "champion, same data"}
    warm_config = dataclasses.replace(config, epochs=1, snapshot_weights=True)
    warm = train_model(warm_config, data, "warm", warm_start=record)
    publish_gradients(Storage(config.storage), warm)
    start = gradient_arrays(Path(config.storage) / "runs" / "warm", step=1, field="weights")
    champion_model = keras.saving.load_model(result.model_uri)
    for name, variable in zip(warm.variables, champion_model.trainable_variables, strict=True):
        np.testing.assert_array_equal(start[name], variable.numpy())
    assert warm.warm_start == record
