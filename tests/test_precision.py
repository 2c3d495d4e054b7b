"""--precision: mixed policies train, keep float32 variables, and export the true (unscaled) float32 gradients."""

import dataclasses
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest

from tapeline.config import RunConfig
from tapeline.errors import ConfigError
from tapeline.gradients.writers import snapshot_file
from tapeline.storage.root import Storage
from tapeline.training.loop import train_model
from tests.helpers import tiny_prepared


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    config, data = tiny_prepared(root, n_train=320, n_test=20, epochs=2, batch_size=32, seed=4, validation_size=32, snapshot_every=100)
    return config, data, train_model(config, data, "float32")


def step_one(trained) -> list[np.ndarray]:
    table = pq.read_table(snapshot_file(Path(trained.gradients_uri), 1, 1))
    assert table.schema.field("values").type.value_type == "float"
    return [np.asarray(v) for v in table.column("values").to_pylist()]


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_exports_true_gradients(setup, precision):
    config, data, reference = setup
    trained = train_model(dataclasses.replace(config, precision=precision), data, precision)
    assert trained.epochs[-1]["train_loss"] < trained.epochs[0]["train_loss"]
    # Same weights, same batch: 16-bit compute moves the gradient a little, loss scaling
    # (2**15 for float16) must not move it at all.
    for mixed, exact in zip(step_one(trained), step_one(reference)):
        assert np.all(np.isfinite(mixed))
        assert np.linalg.norm(mixed - exact) <= 0.05 * np.linalg.norm(exact) + 1e-6
    model = keras.models.load_model(trained.model_uri, safe_mode=True)
    assert all(v.dtype == "float32" for v in model.trainable_variables)


def test_unknown_precision(tmp_path):
    with pytest.raises(ConfigError, match="unknown precision 'float8'"):
        RunConfig(storage=str(tmp_path), precision="float8").validated()


def test_float16_storage_of_gradients(setup):
    config, data, reference = setup
    trained = train_model(dataclasses.replace(config, gradient_dtype="float16", snapshot_weights=True), data, "stored-f16")
    from tapeline.gradients.export import publish_gradients

    publish_gradients(Storage(config.storage), trained)  # the float16 schema is a valid gradient schema
    table = pq.read_table(snapshot_file(Path(trained.gradients_uri), 1, 1))
    assert table.schema.field("values").type.value_type == "halffloat"
    assert table.schema.field("weights").type.value_type == "halffloat"
    for stored, exact in zip(table.column("values").to_pylist(), step_one(reference)):
        np.testing.assert_allclose(np.asarray(stored, np.float32), exact, rtol=1e-3, atol=1e-7)
