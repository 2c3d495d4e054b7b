"""--device and --devices: MirroredStrategy on the CPU split into 2 logical devices, against one device."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pyarrow.parquet as pq
import pytest

from tapeline.errors import ConfigError
from tapeline.reader import read_samples, read_steps
from tapeline.training.devices import resolve_devices
from tapeline.training.loop import train_model
from tests.conftest import tiny_prepared

ROOT = Path(__file__).resolve().parent.parent


def test_more_devices_than_the_machine_has():
    with pytest.raises(ConfigError, match=f"devices {os.cpu_count() + 1}: this machine has no GPU"):
        resolve_devices("auto", os.cpu_count() + 1)


def test_gpu_without_a_gpu_is_an_error():
    with pytest.raises(ConfigError, match="TensorFlow sees no GPU"):
        resolve_devices("gpu")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores for 2 logical devices")
def test_two_devices_match_one(tmp_path):
    # 385 training samples, batches of 32: the last batch has one sample, so replica 1's slice is empty.
    config, data = tiny_prepared(
        tmp_path, n_train=401, n_test=20, epochs=1, batch_size=32, seed=9, validation_size=16, snapshot_every=4, jit_compile=False
    )
    one = train_model(config, data, "one")

    # Logical devices must be set before TensorFlow starts: a process of its own.
    job = tmp_path / "job.json"
    two_config = dataclasses.replace(config, devices=2)
    job.write_text(json.dumps({"config": dataclasses.asdict(two_config), "data": dataclasses.asdict(data), "run_id": "two"}))
    worker = subprocess.run(
        [sys.executable, "-m", "tests.train_worker", str(job)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert "training on /CPU:0, /CPU:1" in worker.stdout
    two = Path(config.storage) / "runs" / "two"

    for name in sorted(p.relative_to(one.gradients_uri) for p in Path(one.gradients_uri).glob("epoch=*/step-*.parquet")):
        expected, actual = pq.read_table(Path(one.gradients_uri) / name), pq.read_table(two / "gradients" / name)
        assert actual.column("variable").equals(expected.column("variable"))
        for a, e in zip(actual.column("values").to_pylist(), expected.column("values").to_pylist()):
            np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-5)  # all-reduced sum vs one device: rounding only
    one_steps, two_steps = read_steps(Path(one.steps_uri).parent), read_steps(two)
    np.testing.assert_allclose(two_steps.column("loss").to_numpy(), one_steps.column("loss").to_numpy(), rtol=1e-3)
    weights = [keras.models.load_model(p, safe_mode=True).get_weights() for p in (one.model_uri, two / "model.keras")]
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-4)
    # Each replica's examples: the same per-example rows as one device, in the batch's order.
    one_samples, two_samples = (read_samples(run).sort_by([("step", "ascending")]) for run in (Path(one.steps_uri).parent, two))
    for name in ("step", "sample_id", "label", "predicted", "correct"):
        assert two_samples.column(name).equals(one_samples.column(name)), name
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(two_samples.column(name).to_numpy(), one_samples.column(name).to_numpy(), rtol=1e-3)
    np.testing.assert_allclose(two_steps.column("grad_variance").to_numpy(), one_steps.column("grad_variance").to_numpy(), rtol=1e-2)
