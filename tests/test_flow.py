"""train-flow end to end, through a real Prefect API, on the real Fashion-MNIST files."""

import base64
import hashlib
import json
import re
from pathlib import Path

import duckdb
import keras
import numpy as np
import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    DeploymentFilter,
    DeploymentFilterId,
    FlowRunFilter,
    FlowRunFilterName,
)
from prefect.deployments import run_deployment
from prefect.exceptions import ParameterTypeError, PrefectHTTPStatusError

from tapeline.cli import main
from tapeline.data.registry import FASHION_MNIST
from tapeline.data.splits import read_split
from tapeline.errors import ConfigError, NonFiniteError
from tapeline.flows.train import train_flow
from tapeline.gradients import verify
from tapeline.model import build_model
from tapeline.reader import gradient_arrays, read_gradients

pytestmark = pytest.mark.usefixtures("prefect_api")


@pytest.fixture(scope="module")
def storage(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
def first_run(storage, fashion_mnist_dir) -> dict:
    # The budget: 1 epoch on 10,000 samples.
    return one_epoch(storage, str(fashion_mnist_dir), "e2e", train_limit=10_000, snapshot_every=100, snapshot_weights=True)


def one_epoch(storage: Path, source: str, run_name: str, **parameters) -> dict:
    """A train-flow run of one epoch on Fashion-MNIST from `source`."""
    return train_flow(dataset="fashion-mnist", source=source, storage=str(storage), run_name=run_name, epochs=1, **parameters)


@pytest.mark.slow
def test_end_to_end_on_fashion_mnist(first_run, storage):
    manifest = json.loads((storage / "runs" / "e2e" / "run.json").read_text())
    assert manifest == first_run
    assert manifest["metrics"]["test_accuracy"] >= 0.80
    assert set(manifest["stages"]) == {"download", "preprocess", "curate", "train", "export_gradients", "label_issues", "evaluate", "promote"}
    assert manifest["promotion"]["promoted"] and manifest["promotion"]["reason"] == "no champion yet"
    assert (
        manifest["promotion"]["challenger"]["test_set"]
        == hashlib.sha256((manifest["dataset"]["sha256"]["test_images"] + manifest["dataset"]["sha256"]["test_labels"]).encode()).hexdigest()[:16]
    )
    assert not manifest["stages"]["download"]["cached"] and not manifest["stages"]["preprocess"]["cached"]
    for name, uri in manifest["uris"].items():
        assert Path(uri).exists(), name
    assert manifest["parameters"]["train_limit"] == 10_000 and manifest["device"] == "/CPU:0"
    epoch = manifest["metrics"]["epochs"][0]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "seconds", "train_samples_per_second"} <= set(epoch)
    assert len(manifest["dataset"]["sha256"]) == 4


def flow_run_and_artifacts(name: str | None = None, flow_run_id=None) -> tuple:
    """A flow run as the Prefect API has it (by name or id), and its artifacts by key."""
    with get_client(sync_client=True) as client:
        if flow_run_id is None:
            (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))
        else:
            run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    return run, {artifact.key: artifact for artifact in artifacts}


@pytest.mark.slow
def test_prefect_shows_the_first_run_its_promotion_and_itself_in_the_registry(first_run):
    run, artifacts = flow_run_and_artifacts(name="e2e")
    assert "dataset:fashion-mnist" in run.tags
    registry = json.loads(artifacts["model-registry"].data)
    assert [(row["run"], row["status"]) for row in registry] == [("e2e", "champion")]
    promotion = artifacts["promotion"].data
    accuracy = first_run["metrics"]["test_accuracy"]
    assert f"| challenger | `e2e` | fashion-mnist | {accuracy:.4f} | promoted | 0 |" in promotion
    assert "Reason: no champion yet." in promotion and "{" not in promotion


def samples_columns(line: str) -> tuple[str, ...]:
    """A row of `tapeline samples` by column (rank, sample_id, label, predicted, at step, mean norm, mean loss, seen):
    by position, as class names may hold a space ("Ankle boot")."""
    bounds = [(0, 4), (5, 14), (16, 30), (31, 45), (46, 53), (54, 64), (65, 74), (75, 79)]
    return tuple(line[start:end].strip() for start, end in bounds)


@pytest.mark.slow
def test_prefect_shows_the_hardest_examples_as_tapeline_samples_ranks_them(first_run, storage, capsys):
    """The artifact's prediction of each example is the CLI's: the same class, at the same step."""
    run, artifacts = flow_run_and_artifacts(name="e2e")
    markdown = artifacts["hardest-examples"].data
    pngs = [base64.b64decode(data) for data in re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)]
    directory = storage / "runs" / "e2e"
    assert pngs == [(directory / "hardest_examples.png").read_bytes()] and len(pngs[0]) < 100_000
    table = [tuple(cell.strip() for cell in line.strip("|").split("|")) for line in markdown.splitlines() if re.match(r"\| \d+ \|", line)]
    assert main(["samples", str(directory), "--top", "32"]) == 0
    cli = [samples_columns(line)[:6] for line in capsys.readouterr().out.splitlines()[1:]]  # rank … mean norm
    assert table == cli and len(cli) == 32
    assert any(label != predicted for _, _, label, predicted, _, _ in cli)


@pytest.mark.slow
def test_prefect_shows_the_noise_scale_run_json_records(first_run, storage):
    run, artifacts = flow_run_and_artifacts(name="e2e")
    markdown = artifacts["noise-scale"].data
    pngs = [base64.b64decode(data) for data in re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)]
    assert pngs == [(storage / "runs" / "e2e" / "noise_scale.png").read_bytes()] and len(pngs[0]) < 100_000
    median = first_run["metrics"]["noise_scale_smoothed_median_last_epoch"]
    assert f"**{median:.4g}: the median over the last epoch (epoch 1) of the smoothed value**" in markdown
    assert f"this run used {first_run['parameters']['batch_size']}." in markdown
    norms = json.loads(artifacts["gradient-norms"].data)
    assert all(len(repr(row[name])) <= 12 for row in norms for name in ("last L2 norm", "mean L2 norm", "max L2 norm"))


@pytest.mark.slow
def test_flow_run_is_named_after_its_run_id_and_tagged_with_the_dataset(first_run, storage):
    state = train_flow(dataset="fashion-mnist", source="/nonexistent", storage=str(storage), epochs=1, train_limit=64, return_state=True)
    manifest = state.result()
    run, artifacts = flow_run_and_artifacts(flow_run_id=state.state_details.flow_run_id)
    assert run.name == manifest["run_id"] != "e2e" and (storage / "runs" / run.name / "run.json").exists()
    assert "dataset:fashion-mnist" in run.tags
    registry = {row["run"]: row["status"] for row in json.loads(artifacts["model-registry"].data)}
    assert registry[run.name] == "not promoted" and registry["e2e"] == "champion"
    promotion = artifacts["promotion"].data
    assert f"| challenger | `{run.name}` |" in promotion and "| champion | `e2e` | fashion-mnist |" in promotion
    assert "| not promoted |" in promotion and "| stays current |" in promotion


@pytest.mark.slow
def test_model_card_says_how_to_use_the_model(first_run):
    card_path = Path(first_run["uris"]["model_card"])
    assert card_path == Path(first_run["uris"]["model"]).with_name("model.json")
    card = json.loads(card_path.read_text())
    assert card["run_id"] == "e2e" and card["model"] == first_run["uris"]["model"]
    assert card["classes"] == list(FASHION_MNIST.classes) and card["classes"][9] == "Ankle boot"
    assert card["dataset"] == {"name": "fashion-mnist", "sha256": first_run["dataset"]["sha256"]}
    assert card["metrics"]["test_accuracy"] == first_run["metrics"]["test_accuracy"]
    assert (card["input"]["dtype"], card["input"]["range"], card["output"]["values"]) == ("uint8", [0, 255], "logits")
    # Fed as the card says, the model scores what the card records; rescaled first, it guesses.
    model = keras.models.load_model(card["model"])
    images, labels, _ = read_split(first_run["uris"]["test"])
    assert images.dtype == card["input"]["dtype"] and list(images.shape[1:]) == card["input"]["shape"][1:]

    def accuracy(pixels: np.ndarray) -> float:
        return float(np.mean(model.predict(pixels, batch_size=1024, verbose=0).argmax(axis=1) == labels))

    assert accuracy(images) == pytest.approx(card["metrics"]["test_accuracy"])
    assert accuracy(images / 255) < 0.2


@pytest.mark.slow
def test_gradient_rows_for_every_variable_readable_with_duckdb(first_run):
    gradients = first_run["uris"]["gradients"]
    rows = duckdb.sql(
        f"SELECT variable, count(*) AS snapshots, max(step) AS last_step, "
        f"max(len(\"values\")) AS size FROM read_parquet('{gradients}/*/step-*.parquet') GROUP BY variable"
    ).fetchall()
    expected = {v.path: int(v.numpy().size) for v in build_model().trainable_variables}
    assert {name: size for name, _, _, size in rows} == expected
    steps = 10_000 // 32 + 1  # 313 steps: snapshots at 1, 100, 200, 300 and the last
    assert {(snapshots, last) for _, snapshots, last, _ in rows} == {(5, steps)}


@pytest.mark.slow
def test_second_run_downloads_and_preprocesses_nothing(first_run, storage):
    second = one_epoch(storage, "/nonexistent", "again", train_limit=64)
    assert second["stages"]["download"]["cached"] and second["stages"]["preprocess"]["cached"]
    assert same_data(second, first_run)
    assert Path(second["uris"]["model"]).parent.name == "again"
    # 64 training samples make a worse model: it is recorded, not promoted.
    assert not second["promotion"]["promoted"] and second["promotion"]["champion"]["run_id"] == "e2e"
    assert json.loads((storage / "models" / "current").read_text())["run_id"] == "e2e"


@pytest.mark.slow
def test_warm_start_from_the_champion_with_refreshed_data(first_run, storage, fashion_mnist_dir):
    warm = one_epoch(storage, str(fashion_mnist_dir), "warm", train_limit=64, warm_start=True, refresh=True)
    assert warm["warm_start"] == {"from": "e2e", "model": first_run["uris"]["model"], "reason": "champion, same data"}
    assert warm["parameters"]["warm_start"]
    assert not warm["stages"]["download"]["cached"] and not warm["stages"]["preprocess"]["cached"]
    assert same_data(warm, first_run)
    # Two steps from random weights reach about 0.3; from the champion's, its accuracy.
    assert warm["metrics"]["test_accuracy"] > first_run["metrics"]["test_accuracy"] - 0.05


def test_flow_rejects_bad_parameters_before_any_stage(tmp_path):
    # Prefect checks the parameters against their annotated constraints before the flow body runs.
    with pytest.raises(ParameterTypeError, match="learning_rate"):
        train_flow(storage=str(tmp_path / "store"), learning_rate=-1.0)
    assert not (tmp_path / "store").exists()
    # What needs the environment is checked in the body, still before any stage.
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        train_flow(storage=str(tmp_path / "file" / "store"))


@pytest.mark.parametrize(
    "parameters, named",
    [
        ({"epochs": 0}, "epochs"),
        ({"learning_rate": -1}, "learning_rate"),
        ({"gradient_dtype": "float64"}, "gradient_dtype"),
        ({"run_name": "../escape"}, "run_name"),
        ({"epochs": "many"}, "epochs"),
    ],
)
def test_deployment_rejects_a_run_that_breaks_a_constraint_when_it_is_created(parameters, named):
    """The deployment's parameter schema carries the constraints: the API refuses the run; none is created."""
    deployment_id = train_flow.to_deployment(name="constraints").apply()
    with pytest.raises(PrefectHTTPStatusError, match=f"Validation failed for field '{named}'"):
        run_deployment("train-flow/constraints", parameters=parameters, timeout=0)
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
        assert runs == []
        accepted = client.create_flow_run_from_deployment(deployment_id, parameters={"epochs": 1})  # a good value goes through
        client.delete_flow_run(accepted.id)


@pytest.mark.slow
def test_verify_recomputes_the_last_snapshot(first_run, capsys):
    run_json = str(Path(first_run["uris"]["model"]).parent / "run.json")
    assert main(["verify", run_json]) == 0
    assert "agrees" in capsys.readouterr().out
    report = verify.verify_snapshot(run_json, step=1)
    assert report["max_relative_difference"] <= 1e-4


@pytest.mark.slow
def test_reader_and_duckdb_on_a_real_run(first_run):
    run = Path(first_run["uris"]["model"]).parent
    norms = read_gradients(run, columns=["step", "variable", "l2_norm"])
    assert norms.column_names == ["step", "variable", "l2_norm"] and norms.num_rows == 5 * 6
    arrays = gradient_arrays(run, 1, variables=["cnn/dense/kernel"])
    assert arrays["cnn/dense/kernel"].shape == (21632, 128)
    spikes = duckdb.sql(
        f"SELECT step, epoch, l2_norm, nan_count FROM read_parquet('{run}/stats/*/stats-*.parquet', hive_partitioning = true) "
        f"WHERE variable = 'cnn/dense/kernel' ORDER BY step"
    ).fetchall()
    assert [row[0] for row in spikes] == list(range(1, 314)) and all(row[3] == 0 for row in spikes)
    assert {row[1] for row in spikes} == {1}


@pytest.mark.slow
def test_diverging_run_fails_but_exports_the_failing_step(first_run, storage):
    with pytest.raises(NonFiniteError) as raised:
        train_flow(dataset="fashion-mnist", storage=str(storage), run_name="diverges", epochs=1, train_limit=640, learning_rate=1e10)
    manifest = json.loads((storage / "runs" / "diverges" / "gradients.manifest.json").read_text())
    assert manifest["anomalies"][-1]["step"] == raised.value.trained.steps
    # No model, but the samples and steps up to the failing one: the hardest examples and the noise scale need no more.
    assert all((storage / "runs" / "diverges" / name).stat().st_size > 0 for name in ("hardest_examples.png", "noise_scale.png"))


def test_run_id_without_a_run_name_is_the_flow_runs_and_survives_a_retry():
    from prefect import flow
    from prefect.context import FlowRunContext

    from tapeline.tasks.runs import flow_run_name, new_run_id

    @flow
    def ids() -> tuple[str, str, str, str]:
        run = FlowRunContext.get().flow_run
        return new_run_id(), new_run_id(), flow_run_name(), f"{run.created:%Y%m%d-%H%M%S}-{run.id.hex[:6]}"

    first, again, name, expected = ids()
    assert first == again == name == expected  # a function of the flow run alone, which a retry keeps


@pytest.mark.slow
def test_samples_rank_the_hardest_examples_and_run_json_holds_the_noise_scale(first_run, capsys):
    run = Path(first_run["uris"]["model"]).parent
    metrics = first_run["metrics"]
    noise = metrics["noise_scale_smoothed_median_last_epoch"]
    assert noise > 0 and metrics["suggested_batch_size"] == max(1, round(noise)) and "noise_scale" not in metrics
    assert metrics["batch_size"] == 32 and first_run["uris"]["samples"] == str(run / "samples")
    assert main(["samples", str(run), "--top", "5", "--label", "6"]) == 0
    rows = [samples_columns(line) for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 5 and all(row[2] == "Shirt" and row[3] in FASHION_MNIST.classes for row in rows)  # names, not numbers
    norms = [float(row[5]) for row in rows]
    assert norms == sorted(norms, reverse=True)
    assert main(["samples", str(run.parent / "nope")]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def same_data(run: dict, other: dict) -> bool:
    """Whether two runs' run.json record the same data (digests, splits); how many samples each trained on may differ."""
    return {**run["dataset"], "train_samples": None} == {**other["dataset"], "train_samples": None}
