"""Per-step values travel by name: one added in a temporary schema, computed in the step, arrives in `steps/` and in
TensorBoard through a real short training, with nothing else told of it."""

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tapeline.gradients.schema import EXAMPLE_COLUMNS, STAT_NAMES, STEP_COLUMNS, StepColumn, step_schema
from tapeline.gradients.writers import StepLog
from tapeline.reader import read_samples, read_steps
from tapeline.storage.root import Storage
from tapeline.training.calls import STEP_VALUES
from tapeline.training.loop import train_model
from tapeline.training.summaries import STEP_EVERY

EPOCHS, BATCH = 2, 16
SQUARES, ACCURACY = "grad_sum_of_squares", "batch_accuracy"
CORRECT = list(EXAMPLE_COLUMNS).index("correct")  # per_example.packed: the columns in EXAMPLE_COLUMNS' order


def sum_of_squares(loss, gradients, examples):
    return tf.add_n([tf.reduce_sum(tf.square(tf.cast(g, tf.float32))) for g in gradients])


def batch_accuracy(loss, gradients, examples):
    return tf.reduce_mean(examples[:, CORRECT])


@pytest.fixture
def extended(monkeypatch):
    """The schema and the step, each with two more per-step values, for this test only: one from the gradients,
    shown in TensorBoard, and one from the per-example rows, stored only."""
    monkeypatch.setitem(STEP_COLUMNS, SQUARES, StepColumn(pa.float32(), "step/grad_sum_of_squares", "Σ g² over every variable"))
    monkeypatch.setitem(STEP_COLUMNS, ACCURACY, StepColumn(pa.float32()))
    monkeypatch.setitem(STEP_VALUES, SQUARES, sum_of_squares)
    monkeypatch.setitem(STEP_VALUES, ACCURACY, batch_accuracy)


@pytest.fixture
def trained(tmp_path, extended):
    from tests.helpers import tiny_prepared

    config, data = tiny_prepared(tmp_path, epochs=EPOCHS, batch_size=BATCH, seed=5, validation_size=40, snapshot_every=7)
    return train_model(config, data, "run-values")


def test_a_new_per_step_value_arrives_in_the_steps_parquet_and_in_tensorboard(trained):
    run = Path(trained.steps_uri).parent
    files = duckdb.sql(f"SELECT step, global_norm, {SQUARES}, {ACCURACY} FROM read_parquet('{run}/steps/**/*.parquet') ORDER BY step").df()
    assert files["step"].tolist() == list(range(1, trained.steps + 1))
    assert files[SQUARES].dtype == np.float32 and files[ACCURACY].dtype == np.float32
    np.testing.assert_allclose(files[SQUARES], files["global_norm"].astype(np.float64) ** 2, rtol=1e-4)  # from the gradients
    samples = read_samples(run, columns=["step", "correct"]).to_pandas().groupby("step")["correct"].mean()
    np.testing.assert_allclose(files[ACCURACY], samples.loc[files["step"]].to_numpy(), rtol=1e-6)  # from the examples
    assert read_steps(run).schema.equals(step_schema())  # the reader takes the schema as it is

    accumulator = event_accumulator.EventAccumulator(str(trained.tensorboard_uri), size_guidance={event_accumulator.TENSORS: 0}).Reload()
    written = {event.step: float(tf.make_ndarray(event.tensor_proto)) for event in accumulator.Tensors("step/grad_sum_of_squares")}
    assert sorted(written) == list(range(STEP_EVERY, trained.steps + 1, STEP_EVERY)) and len(written) >= 3
    for step, value in written.items():
        assert value == pytest.approx(float(files[SQUARES][step - 1]), rel=1e-6), step
    assert accumulator.SummaryMetadata("step/grad_sum_of_squares").summary_description == "Σ g² over every variable"
    assert not [tag for tag in accumulator.Tags()["tensors"] if ACCURACY in tag]  # no tag in its column: not shown


def test_the_steps_schema_is_the_stored_one():
    """Without an extension, `steps/` holds what docs/data-format.md promises, in that order."""
    assert step_schema() == pa.schema(
        [
            ("step", pa.int64()), ("epoch", pa.int32()), ("loss", pa.float32()), ("global_norm", pa.float32()),
            ("learning_rate", pa.float32()), ("sample_ids", pa.list_(pa.int64())),
            ("grad_variance", pa.float32()), ("grad_signal", pa.float32()), ("grad_noise_scale", pa.float32()),
        ]
    )  # fmt: skip
    assert {name: column.tag for name, column in STEP_COLUMNS.items() if column.tag} == {
        "loss": "step/loss", "global_norm": "step/grad_norm", "grad_noise_scale": "step/noise_scale_raw",
    }  # fmt: skip


def test_a_value_the_schema_lacks_is_refused_by_name(tmp_path):
    """A misspelt name would be a column nobody reads: the log refuses it when it is handed over, not later."""
    storage = Storage(str(tmp_path))
    log = StepLog(storage, storage.layout.run("run"), ["dense/kernel"])
    with pytest.raises(ValueError, match="grad_sum_of_sqares"):
        log.append(1, 1, {"loss": 0.5, "grad_sum_of_sqares": 1.0}, np.arange(4), np.zeros((1, len(STAT_NAMES)), np.float32))
    log.close()
    assert not list(tmp_path.rglob("*.parquet"))
