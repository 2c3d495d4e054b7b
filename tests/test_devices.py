"""--device and --devices: MirroredStrategy on the CPU split into 2 logical devices, against one device."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tapeline.data.splits import read_split
from tapeline.errors import ConfigError
from tapeline.reader import read_samples, read_stats, read_steps
from tapeline.training.devices import resolve_devices
from tapeline.training.loop import train_model
from tests.helpers import tiny_prepared

ROOT = Path(__file__).resolve().parent.parent


def test_more_devices_than_the_machine_has():
    with pytest.raises(ConfigError, match=f"devices {os.cpu_count() + 1}: this machine has no GPU"):
        resolve_devices("auto", os.cpu_count() + 1)


def test_gpu_without_a_gpu_is_an_error():
    with pytest.raises(ConfigError, match="TensorFlow sees no GPU"):
        resolve_devices("gpu")


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPU cores for 2 logical devices")
@pytest.mark.parametrize(
    "train_limit",
    [
        88,  # 2 × 32 + 24: the default data's shape (55,000 = 1,718 × 32 + 24); replica 1 has 8 real rows of 16
        103,  # 3 × 32 + 7: an odd remainder; replica 0 has 7 real rows, replica 1's slice is all padding
    ],
)
def test_two_devices_match_one(tmp_path, train_limit):
    # A partial last batch in a call of several steps (steps_per_call 50, snapshots at steps 1, 5 and the last):
    # a collective in the call's graph loop keeps its first step's shape.
    config, data = tiny_prepared(
        tmp_path, n_train=136, n_test=20, epochs=2, batch_size=32, seed=9, validation_size=16, train_limit=train_limit,
        snapshot_every=5, jit_compile=False,
    )  # fmt: skip
    one = train_model(config, data, "one")

    # Logical devices must be set before TensorFlow starts: a process of its own.
    job = tmp_path / "job.json"
    two_config = dataclasses.replace(config, devices=2)
    job.write_text(json.dumps({"config": dataclasses.asdict(two_config), "data": dataclasses.asdict(data), "run_id": "two"}))
    result = tmp_path / "result.json"
    worker = subprocess.run([sys.executable, "-m", "tests.train_worker", str(job), str(result)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert worker.returncode == 0, worker.stderr[-2000:]
    assert "training on /CPU:0, /CPU:1" in worker.stdout
    assert "epoch 2/2" in worker.stdout
    two = Path(config.storage) / "runs" / "two"

    # Every example of the split trained on once per epoch, padding nowhere: the steps' sample ids and the per-example rows.
    _, _, split_ids = read_split(data.uris["train"], train_limit)
    steps_per_epoch = -(-train_limit // 32)
    one_steps, two_steps = read_steps(Path(one.steps_uri).parent), read_steps(two)
    assert two_steps.column("step").to_pylist() == list(range(1, 2 * steps_per_epoch + 1))
    two_samples = read_samples(two).sort_by([("step", "ascending")])
    for epoch in (1, 2):
        steps = two_steps.filter(pc.equal(two_steps.column("epoch"), epoch))
        assert sorted(pc.list_flatten(steps.column("sample_ids")).to_pylist()) == sorted(split_ids.tolist())
        samples = two_samples.filter(pc.equal(two_samples.column("epoch"), epoch))
        assert samples.column("sample_id").to_pylist() == pc.list_flatten(steps.column("sample_ids")).to_pylist()

    # The same training as one device, the partial last batch included (the last step is a snapshot).
    gradient_files = sorted(p.relative_to(one.gradients_uri) for p in Path(one.gradients_uri).glob("epoch=*/step-*.parquet"))
    assert int(gradient_files[-1].stem.removeprefix("step-")) == 2 * steps_per_epoch, gradient_files
    for name in gradient_files:
        expected, actual = pq.read_table(Path(one.gradients_uri) / name), pq.read_table(two / "gradients" / name)
        assert actual.column("variable").equals(expected.column("variable"))
        for a, e in zip(actual.column("values").to_pylist(), expected.column("values").to_pylist()):
            np.testing.assert_allclose(a, e, rtol=1e-3, atol=1e-5)  # all-reduced sum vs one device: rounding only
    np.testing.assert_allclose(two_steps.column("loss").to_numpy(), one_steps.column("loss").to_numpy(), rtol=1e-3)
    one_stats, two_stats = (read_stats(run).sort_by([("step", "ascending"), ("variable", "ascending")]) for run in (Path(one.steps_uri).parent, two))
    for name in ("l2_norm", "max_abs"):  # every step's gradient statistics
        np.testing.assert_allclose(two_stats.column(name).to_numpy(), one_stats.column(name).to_numpy(), rtol=1e-3, err_msg=name)
    weights = [keras.models.load_model(p, safe_mode=True).get_weights() for p in (one.model_uri, two / "model.keras")]
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-2, atol=1e-4)
    # Each replica's examples: the same per-example rows as one device, in the batch's order.
    one_samples = read_samples(Path(one.steps_uri).parent).sort_by([("step", "ascending")])
    for name in ("step", "sample_id", "label", "predicted", "correct"):
        assert two_samples.column(name).equals(one_samples.column(name)), name
    for name in ("loss", "grad_norm"):
        np.testing.assert_allclose(two_samples.column(name).to_numpy(), one_samples.column(name).to_numpy(), rtol=1e-3)
    for name in ("grad_variance", "grad_signal", "grad_noise_scale"):
        np.testing.assert_allclose(two_steps.column(name).to_numpy(), one_steps.column(name).to_numpy(), rtol=1e-2, err_msg=name)
    # The epochs' running metrics: means over the real examples.
    two_epochs = json.loads(result.read_text())["epochs"]
    for name in ("train_loss", "train_accuracy"):
        np.testing.assert_allclose([e[name] for e in two_epochs], [e[name] for e in one.epochs], rtol=1e-3, err_msg=name)
