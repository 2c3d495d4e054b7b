"""What a run writes to TensorBoard, read back as TensorBoard reads it: two tiny real runs, their event files, and
the HParams dashboard of a real TensorBoard server pointed at `<storage>/runs`."""

import dataclasses
import json
import math
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tapeline.gradients.noise import NOISE_SCALE_METRIC, smoothed_noise_scale
from tapeline.gradients.noise_report import noise_scale_median_last_epoch
from tapeline.gradients.schema import PARTITIONING
from tapeline.reader import read_samples, read_steps
from tapeline.storage.root import Storage
from tapeline.training.loop import train_model
from tapeline.training.summaries import RunSummaries, write_run_metrics
from tests.helpers import free_port

EPOCHS, BATCH, SNAPSHOT_EVERY = 2, 16, 5
TEST_ACCURACY = 0.875


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs side by side in one storage root, differing in learning rate; the first with a test accuracy."""
    from tests.helpers import tiny_prepared

    config, data = tiny_prepared(
        tmp_path_factory.mktemp("tensorboard"), epochs=EPOCHS, batch_size=BATCH, seed=3, validation_size=40, snapshot_every=SNAPSHOT_EVERY
    )
    first = train_model(config, data, "run-a")
    second = train_model(dataclasses.replace(config, learning_rate=3e-3), data, "run-b")
    noise = noise_scale_median_last_epoch(str(tensorboard_dir(first).parent))  # run.json's, as export_gradients takes it
    write_run_metrics(Storage(config.storage), "run-a", first.steps, {"test_accuracy": TEST_ACCURACY, NOISE_SCALE_METRIC: noise})
    write_run_metrics(Storage(config.storage), "run-b", second.steps, {NOISE_SCALE_METRIC: None})  # none: nothing written
    return config, first, second


def events(directory: Path) -> event_accumulator.EventAccumulator:
    """Every event file of a run's TensorBoard directory, nothing sampled away."""
    accumulator = event_accumulator.EventAccumulator(str(directory), size_guidance={event_accumulator.TENSORS: 0})
    return accumulator.Reload()


def values(accumulator, tag: str) -> dict[int, np.ndarray]:
    """{step: value} of a tag (a scalar's float, a histogram's [buckets, (left, right, count)] array)."""
    return {event.step: tf.make_ndarray(event.tensor_proto) for event in accumulator.Tensors(tag)}


def tensorboard_dir(result) -> Path:
    return Path(result.tensorboard_uri)


def test_step_scalars_every_tenth_step_match_the_step_log(runs):
    config, first, _ = runs
    accumulator = events(tensorboard_dir(first))
    steps = read_steps(str(tensorboard_dir(first).parent), columns=["step", "loss", "global_norm"]).to_pydict()
    logged = dict(zip(steps["step"], zip(steps["loss"], steps["global_norm"])))
    expected_steps = list(range(10, first.steps + 1, 10))
    assert len(expected_steps) >= 3
    for tag, column in (("step/loss", 0), ("step/grad_norm", 1)):
        written = values(accumulator, tag)
        assert sorted(written) == expected_steps, tag
        for step, value in written.items():
            assert float(value) == pytest.approx(logged[step][column], rel=1e-5), (tag, step)
        assert accumulator.SummaryMetadata(tag).plugin_data.plugin_name == "scalars"


def test_noise_scale_raw_and_smoothed_match_the_step_log_and_say_which_they_are(runs):
    """The raw B_simple as stored in `steps`, the smoothed one as gradients/noise.py smooths the stored estimates, each
    tag's description naming its statistic."""
    config, first, _ = runs
    accumulator = events(tensorboard_dir(first))
    columns = ["step", "grad_variance", "grad_signal", "grad_noise_scale"]
    steps = read_steps(str(tensorboard_dir(first).parent), columns=columns).sort_by("step").to_pydict()
    assert steps["step"] == list(range(1, first.steps + 1))
    smoothed = smoothed_noise_scale(np.array(steps["grad_variance"]), np.array(steps["grad_signal"]))
    raw, written = values(accumulator, "step/noise_scale_raw"), values(accumulator, "step/noise_scale_smoothed")
    expected_steps = list(range(10, first.steps + 1, 10))
    assert sorted(raw) == [s for s in expected_steps if math.isfinite(steps["grad_noise_scale"][s - 1])] and raw
    assert sorted(written) == [s for s in expected_steps if math.isfinite(smoothed[s - 1])] and written
    for step in raw:
        assert float(raw[step]) == pytest.approx(steps["grad_noise_scale"][step - 1], rel=1e-5)
    for step in written:  # the log stores float32 estimates, the run smoothed the float64 ones
        assert float(written[step]) == pytest.approx(smoothed[step - 1], rel=1e-4)
    assert "step/noise_scale" not in accumulator.Tags()["tensors"]  # no tag that leaves the statistic unsaid
    smoothed_description = accumulator.SummaryMetadata("step/noise_scale_smoothed").summary_description
    assert smoothed_description.startswith("The gradient noise scale, smoothed: EMA(tr Σ) / EMA(|G|²)")
    assert f"median over the last epoch is run.json's {NOISE_SCALE_METRIC}" in smoothed_description
    assert accumulator.SummaryMetadata("step/noise_scale_raw").summary_description.startswith("Raw: B_simple")


def test_a_resumed_run_smooths_the_noise_scale_on_from_its_checkpoint(runs, tmp_path):
    """Caught up on the steps logged up to the checkpoint (not the ones after it), the curve is the uninterrupted run's."""
    config, first, _ = runs
    run = str(tensorboard_dir(first).parent)
    steps = read_steps(run, columns=["step", "loss", "global_norm", "grad_variance", "grad_signal"]).sort_by("step").to_pylist()
    smoothed = smoothed_noise_scale(np.array([s["grad_variance"] for s in steps]), np.array([s["grad_signal"] for s in steps]))
    checkpoint = first.steps // 2
    with RunSummaries(Storage(config.storage), tmp_path / "resumed", writes=True) as resumed:
        resumed.catch_up(run, checkpoint)  # the log holds every step of the run: those after the checkpoint must not count
        for row in steps[checkpoint:]:
            resumed.step(row["step"], row)
    written = values(events(tmp_path / "resumed"), "step/noise_scale_smoothed")
    assert sorted(written) == [s for s in range(10, first.steps + 1, 10) if s > checkpoint and math.isfinite(smoothed[s - 1])]
    for step, value in written.items():  # the same float32 estimates on both sides: only the scalar's float32 rounding
        assert float(value) == pytest.approx(smoothed[step - 1], rel=1e-6)  # the steps after the checkpoint taken twice: 2e-5


def test_a_histogram_of_each_epochs_per_example_norms(runs):
    """Every example of every step of the epoch, as the samples dataset has its norm."""
    config, first, _ = runs
    accumulator = events(tensorboard_dir(first))
    histograms = values(accumulator, "epoch/example_grad_norms")
    steps_per_epoch = first.steps // EPOCHS
    assert sorted(histograms) == [steps_per_epoch * epoch for epoch in range(1, EPOCHS + 1)]
    for epoch, end in enumerate(sorted(histograms), start=1):
        norms = read_samples(str(tensorboard_dir(first).parent), epochs=[epoch], columns=["grad_norm"]).column("grad_norm").to_numpy()
        assert len(norms) > steps_per_epoch  # examples, not steps
        assert histograms[end][:, 2].sum() == len(norms)
        assert histograms[end][0, 0] == pytest.approx(norms.min(), rel=1e-5) and histograms[end][-1, 1] == pytest.approx(norms.max(), rel=1e-5)
    assert accumulator.SummaryMetadata("epoch/example_grad_norms").plugin_data.plugin_name == "histograms"


def test_a_histogram_per_variable_at_every_snapshot_step_of_the_stored_gradients(runs):
    config, first, _ = runs
    accumulator = events(tensorboard_dir(first))
    stored = pq.read_table(tensorboard_dir(first).parent / "gradients", partitioning=PARTITIONING, columns=["step", "variable", "values"])
    snapshot_steps = sorted(set(stored.column("step").to_pylist()))
    assert len(snapshot_steps) >= 3 and 1 in snapshot_steps and first.steps in snapshot_steps
    assert {tag for tag in accumulator.Tags()["tensors"] if tag.startswith("gradients/")} == {"gradients/" + v for v in first.variables}
    for step, variable, gradient in zip(*(stored.column(c).to_pylist() for c in ("step", "variable", "values"))):
        histogram = values(accumulator, "gradients/" + variable)[step]
        assert histogram[:, 2].sum() == len(gradient), (step, variable)  # every value counted once
        assert histogram[0, 0] == pytest.approx(min(gradient)) and histogram[-1, 1] == pytest.approx(max(gradient))
    for variable in first.variables:
        assert sorted(values(accumulator, "gradients/" + variable)) == snapshot_steps
        assert accumulator.SummaryMetadata("gradients/" + variable).plugin_data.plugin_name == "histograms"


def test_epoch_scalars_are_the_run_history(runs):
    config, first, _ = runs
    accumulator = events(tensorboard_dir(first))
    steps_per_epoch = first.steps // EPOCHS
    for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        written = values(accumulator, "epoch/" + name)
        assert sorted(written) == [steps_per_epoch * epoch for epoch in range(1, EPOCHS + 1)]
        assert [float(written[step]) for step in sorted(written)] == pytest.approx([row[name] for row in first.epochs], rel=1e-6)
    assert [float(v) for v in values(accumulator, "epoch/learning_rate").values()] == pytest.approx([config.learning_rate] * EPOCHS)


def test_the_hparams_dashboard_compares_the_runs_side_by_side(runs, tmp_path):
    """A real TensorBoard on `<storage>/runs`: one row per run, its parameters, its final metrics."""
    config, first, second = runs
    port = free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", f"{config.storage}/runs", "--host", "127.0.0.1", "--port", str(port)]
    with open(tmp_path / "tensorboard.log", "w") as log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT) as server:
        try:
            groups = _session_groups(port, server, expected=2)
        finally:
            server.terminate()
    rows = {group["name"]: group for group in groups}
    assert set(rows) == {"run-a", "run-b"}
    assert rows["run-a"]["hparams"]["learning_rate"] == pytest.approx(1e-3)
    assert rows["run-b"]["hparams"]["learning_rate"] == pytest.approx(3e-3)
    assert rows["run-a"]["hparams"]["dataset"] == "mnist" and rows["run-a"]["hparams"]["batch_size"] == BATCH
    assert "train_limit" not in rows["run-a"]["hparams"]  # no limit: left out, not faked
    for group, result in ((rows["run-a"], first), (rows["run-b"], second)):
        metrics = {value["name"]["tag"]: value for value in group["metricValues"]}
        assert metrics["epoch/val_accuracy"]["value"] == pytest.approx(result.epochs[-1]["val_accuracy"])
        assert metrics["epoch/train_loss"]["value"] == pytest.approx(result.epochs[-1]["train_loss"], rel=1e-6)
        assert metrics["epoch/val_accuracy"]["trainingStep"] == result.steps
    final = {v["name"]["tag"]: v["value"] for v in rows["run-a"]["metricValues"]}
    assert final["metrics/test_accuracy"] == pytest.approx(TEST_ACCURACY)
    noise = noise_scale_median_last_epoch(str(tensorboard_dir(first).parent))
    assert noise > 0 and final[f"metrics/{NOISE_SCALE_METRIC}"] == pytest.approx(noise, rel=1e-6)  # run.json's number
    assert {"metrics/test_accuracy", f"metrics/{NOISE_SCALE_METRIC}"}.isdisjoint(v["name"]["tag"] for v in rows["run-b"]["metricValues"])


def _session_groups(port: int, server: subprocess.Popen, expected: int, attempts: int = 120) -> list[dict]:
    """The HParams plugin's session groups, once the server has loaded `expected` runs with their metrics."""
    request = {
        "startIndex": 0, "sliceSize": 100, "colParams": [],
        "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
    }  # fmt: skip
    groups: list[dict] = []
    for _ in range(attempts):  # it loads the event files in the background after it starts listening
        assert server.poll() is None, "tensorboard exited"
        try:
            answer = urllib.request.urlopen(
                urllib.request.Request(
                    f"http://127.0.0.1:{port}/data/plugin/hparams/session_groups",
                    data=json.dumps(request).encode(),
                    headers={"Content-Type": "application/json"},
                ),
                timeout=30,
            )
            groups = json.loads(answer.read()).get("sessionGroups", [])
            if len(groups) == expected and all(group.get("metricValues") for group in groups):
                return groups
        except OSError:
            pass  # not listening yet
        time.sleep(1)
    raise AssertionError(f"tensorboard showed {len(groups)} session groups, not {expected}")


def test_noise_scale_raw_and_smoothed_skip_what_is_not_finite(tmp_path):
    """B_simple as handed in; smoothed as gradients/noise.py smooths, one step at a time, non-finite steps skipped."""
    directory = tmp_path / "tensorboard"
    rng = np.random.default_rng(0)
    variance, signal = rng.uniform(1, 5, 30), rng.uniform(-0.2, 1, 30)  # ‖𝒢‖² estimates below 0 too
    variance[[4, 19]], signal[12] = math.nan, math.inf
    raw = variance / signal
    raw[19] = math.nan  # step 20: no raw value written
    with RunSummaries(Storage(str(tmp_path)), directory, writes=True) as summaries:
        for step in range(1, 31):
            v, s, b = (float(a[step - 1]) for a in (variance, signal, raw))
            summaries.step(step, {"loss": 1.0 / step, "global_norm": 2.0, "grad_noise_scale": b, "grad_variance": v, "grad_signal": s})
    accumulator = events(directory)
    written_raw, written_smoothed = values(accumulator, "step/noise_scale_raw"), values(accumulator, "step/noise_scale_smoothed")
    smoothed = smoothed_noise_scale(variance, signal)
    assert sorted(written_raw) == [10, 30] and sorted(written_smoothed) == [s for s in (10, 20, 30) if math.isfinite(smoothed[s - 1])]
    assert written_smoothed
    for step in written_raw:
        assert float(written_raw[step]) == pytest.approx(raw[step - 1], rel=1e-6)
    for step in written_smoothed:
        assert float(written_smoothed[step]) == pytest.approx(smoothed[step - 1], rel=1e-6)


def test_no_noise_estimates_no_noise_scalars(tmp_path):
    directory = tmp_path / "tensorboard"
    with RunSummaries(Storage(str(tmp_path)), directory, writes=True) as summaries:
        for step in range(1, 21):
            summaries.step(step, {"loss": 0.5, "global_norm": 1.0})
    assert sorted(events(directory).Tags()["tensors"]) == ["step/grad_norm", "step/loss"]


def test_an_epochs_per_example_norms_are_one_histogram(tmp_path):
    directory = tmp_path / "tensorboard"
    norms = np.random.default_rng(1).gamma(2.0, 0.5, 500).astype(np.float32)
    row = {"train_loss": 0.5, "train_accuracy": 0.8, "val_loss": None, "val_accuracy": None}
    with RunSummaries(Storage(str(tmp_path)), directory, writes=True) as summaries:
        summaries.epoch_end(17, row, 1e-3, norms)
    accumulator = events(directory)
    histogram = values(accumulator, "epoch/example_grad_norms")[17]
    assert histogram[:, 2].sum() == len(norms)
    assert histogram[0, 0] == pytest.approx(norms.min()) and histogram[-1, 1] == pytest.approx(norms.max())
    assert "epoch/val_loss" not in accumulator.Tags()["tensors"]  # no validation split: nothing, not a None


def test_a_worker_that_does_not_write_writes_nothing(tmp_path):
    directory = tmp_path / "tensorboard"
    with RunSummaries(Storage(str(tmp_path)), directory, writes=False) as summaries:
        summaries.start(None, "r")  # not even looked at
        summaries.step(10, {"loss": 0.5, "global_norm": 1.0, "grad_noise_scale": 3.0})
        summaries.snapshot(10, ["dense/kernel"], [np.ones((3, 2), np.float32)])
        summaries.epoch_end(10, {"train_loss": 0.5, "train_accuracy": 0.8, "val_loss": None, "val_accuracy": None}, 1e-3, np.ones(4))
    assert not directory.exists()


def test_a_snapshot_kept_for_a_non_finite_gradient_histograms_its_finite_values(tmp_path):
    """The snapshot most needed (a NaN step) still gets its histograms: TensorBoard cannot draw an edge at NaN."""
    directory = tmp_path / "tensorboard"
    kernel = np.linspace(0.5, 2, 12, dtype=np.float32).reshape(3, 4)  # all positive: the least is not 0
    kernel[0, 0], kernel[2, 3] = np.nan, np.inf
    bias = np.full(4, np.nan, np.float16)
    with RunSummaries(Storage(str(tmp_path)), directory, writes=True) as summaries:
        summaries.snapshot(7, ["dense/kernel", "dense/bias"], [kernel, bias])
    accumulator = events(directory)
    histogram = values(accumulator, "gradients/dense/kernel")[7]
    finite = kernel[np.isfinite(kernel)]
    assert histogram[:, 2].sum() == finite.size and np.isfinite(histogram).all()
    assert histogram[0, 0] == pytest.approx(finite.min()) and histogram[-1, 1] == pytest.approx(finite.max())
    assert values(accumulator, "gradients/dense/bias")[7][:, 2].sum() == 0
