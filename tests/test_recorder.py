"""The gradient recorder on its own: real writers into a temporary run directory, no TensorFlow."""

from __future__ import annotations

import numpy as np
import pyarrow.dataset as ds
import pytest

from tapeline.gradients.recorder import GradientRecorder, NullRecorder, SnapshotPolicy
from tapeline.gradients.schema import NON_FINITE_COUNTS, PARTITIONING, STAT_NAMES, global_norm
from tapeline.gradients.writers import SnapshotWriter, StepLog
from tapeline.storage.root import Storage

VARIABLES = ["dense/kernel", "dense/bias"]
SHAPES = [(3, 2), (2,)]
LAST_STEP = 14


def stats(norm: float = 1.0, nan_in: str | None = None) -> np.ndarray:
    """[variables, STAT_NAMES] of a step whose whole gradient has L2 norm `norm`."""
    rows = np.zeros((len(VARIABLES), len(STAT_NAMES)), np.float32)
    rows[:, STAT_NAMES.index("l2_norm")] = norm / np.sqrt(len(VARIABLES))
    if nan_in:
        rows[VARIABLES.index(nan_in), STAT_NAMES.index("nan_count")] = 1
    return rows


def gradients(step: int) -> list[np.ndarray]:
    return [np.full(shape, step, np.float32) for shape in SHAPES]


class CountingHost:
    """`to_host` that counts its calls: the recorder must copy only what it keeps."""

    def __init__(self):
        self.calls = 0

    def __call__(self, tensors):
        self.calls += 1
        return [np.asarray(t) for t in tensors]


def run_paths(root):
    """The paths of run "run" under the storage root `root`."""
    return Storage(str(root)).layout.run("run")


def recorder(root, snapshot_weights=False, loss_scaled=False, to_host=None) -> GradientRecorder:
    storage, run = Storage(str(root)), run_paths(root)
    return GradientRecorder(
        VARIABLES,
        StepLog(storage, run, VARIABLES),
        SnapshotWriter(storage, run.gradients, "run", VARIABLES),
        SnapshotPolicy(every=5, last_step=LAST_STEP, spike_factor=10),
        learning_rate=0.001,
        loss_scaled=loss_scaled,
        snapshot_weights=snapshot_weights,
        **({"to_host": to_host} if to_host else {}),
    )


def table(root, name: str):
    return ds.dataset(run_paths(root).directory / name, format="parquet", partitioning=PARTITIONING).to_table().sort_by("step")


def test_keeps_first_scheduled_spike_and_last_steps_with_their_weights(tmp_path):
    host = CountingHost()
    with recorder(tmp_path, snapshot_weights=True, to_host=host) as recording:
        for step in range(1, LAST_STEP + 1):
            weights = [np.full(shape, -step, np.float32) for shape in SHAPES]  # before the step: its weights
            recording.before_step(step, weights)
            norm = 50.0 if step == 13 else 1.0  # 13: above 10x the median of the twelve before it
            assert recording.record(step, 1, {"loss": 0.5}, np.arange(step, step + 4), stats(norm), gradients(step)) == []
            if step == 7:
                recording.flush()  # as at a checkpoint
        recording.flush()
    snapshots = table(tmp_path, "gradients")
    reasons = dict(zip(snapshots.column("step").to_pylist(), snapshots.column("reason").to_pylist()))
    assert reasons == {1: "first", 5: "scheduled", 10: "scheduled", 13: "norm-spike", 14: "last"}
    assert host.calls == 4 + 5  # weights of the four scheduled steps, gradients of the five kept
    rows = snapshots.to_pylist()
    for row in rows:
        assert row["values"] == [row["step"]] * int(np.prod(SHAPES[VARIABLES.index(row["variable"])]))
        expected_weights = None if row["step"] == 13 else [-row["step"]] * len(row["values"])  # unscheduled: no weights
        assert row["weights"] == expected_weights
        assert row["l2_norm"] == pytest.approx((50.0 if row["step"] == 13 else 1.0) / np.sqrt(2))
    steps = table(tmp_path, "steps")
    assert steps.column("step").to_pylist() == list(range(1, LAST_STEP + 1))
    assert steps.column("global_norm").to_pylist()[12] == pytest.approx(50.0)
    assert steps.column("sample_ids").to_pylist()[2] == [3, 4, 5, 6]
    assert sorted(p.name for p in (run_paths(tmp_path).steps / "epoch=1").iterdir()) == ["steps-000000001.parquet", "steps-000000008.parquet"]
    assert table(tmp_path, "stats").num_rows == LAST_STEP * len(VARIABLES)


def test_a_non_finite_step_is_kept_named_and_logged(tmp_path):
    with recorder(tmp_path) as recording:
        for step in (1, 2):
            assert recording.record(step, 1, {"loss": 0.5}, np.arange(2), stats(), gradients(step)) == []
        assert recording.record(3, 1, {"loss": 0.5}, np.arange(2), stats(nan_in="dense/bias"), gradients(3)) == ["dense/bias"]
    # The run stops here, without another flush: once closed, the log holds the failing step.
    assert table(tmp_path, "steps").column("step").to_pylist() == [1, 2, 3]
    reasons = dict(zip(*table(tmp_path, "gradients").select(["step", "reason"]).to_pydict().values()))
    assert reasons == {1: "first", 3: "non-finite"}
    assert table(tmp_path, "stats").to_pandas().set_index(["step", "variable"]).loc[(3, "dense/bias"), "nan_count"] == 1


def test_the_non_finite_rule_under_loss_scaling(tmp_path):
    """An overflowing gradient under loss scaling is a skipped step, not a failure; a non-finite loss always is."""
    with recorder(tmp_path, loss_scaled=True) as recording:
        assert recording.record(1, 1, {"loss": 0.5}, np.arange(2), stats(nan_in="dense/kernel"), gradients(1)) == []
        assert recording.record(2, 1, {"loss": float("nan")}, np.arange(2), stats(nan_in="dense/kernel"), gradients(2)) == ["loss", "dense/kernel"]
    reasons = dict(zip(*table(tmp_path, "gradients").select(["step", "reason"]).to_pydict().values()))
    assert reasons == {1: "first", 2: "non-finite"}


def test_the_null_recorder_applies_the_same_rule_and_writes_nothing(tmp_path):
    with NullRecorder(VARIABLES) as recording:
        for step in range(1, LAST_STEP + 1):
            recording.before_step(step, gradients(step))
            assert recording.record(step, 1, {"loss": 0.5}, np.arange(2), stats(50.0 if step == 13 else 1.0), gradients(step)) == []
            recording.flush()
        assert recording.record(15, 1, {"loss": float("inf")}, np.arange(2), stats(nan_in="dense/bias"), gradients(15)) == ["loss", "dense/bias"]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(AttributeError):  # a real class: a misspelt method fails, it is not swallowed
        NullRecorder(VARIABLES).recrod  # noqa: B018


def test_both_recorders_answer_the_same_methods():
    def methods(cls):
        return {name for name in vars(cls) if not name.startswith("_") or name in ("__enter__", "__exit__")}

    assert methods(NullRecorder) == methods(GradientRecorder)


def test_stat_columns_are_named_beside_the_schema():
    rows = stats(3.0, nan_in="dense/kernel")
    assert global_norm(rows) == pytest.approx(3.0)
    assert [STAT_NAMES[i] for i in range(len(STAT_NAMES))[NON_FINITE_COUNTS]] == ["nan_count", "inf_count"]
