"""The issue's three models of one's own, trained for real: the example's SimpleModel on Fashion-MNIST, a Functional
convnet on 32x32 RGB images of an image folder, and a GRU over image rows (the per-example fallback). For each: every
stored per-example norm against brute force, `verify`, a resume after SIGKILL bit-identical, and model.keras scoring
run.json's test accuracy in a fresh process."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import tensorflow as tf

from tapeline.config import RunConfig
from tapeline.data.sources import fetch_files
from tapeline.data.splits import prepare, read_split
from tapeline.flows.train import train_flow
from tapeline.gradients.verify import rebuilt_model, verify_snapshot
from tapeline.model import ModelSpec, per_example_loss
from tapeline.reader import gradient_arrays, read_samples
from tapeline.storage.root import Storage
from tapeline.training.loop import train_model
from tests.helpers import fresh_process_accuracy, image_folder, kill_when, spawn_training, tiny_arrays, write_own_dir

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "models.py"
RUN = {"epochs": 1, "batch_size": 16, "train_limit": 64, "snapshot_every": 2, "snapshot_weights": True}
MODELS = ["simple_model", "small_convnet", "row_gru"]


def data_parameters(kind: str, directory: Path, fashion_mnist_dir: Path) -> dict:
    """The dataset each model trains on: Fashion-MNIST, a folder of 32x32 RGB PNGs, tiny IDX files."""
    if kind == "simple_model":
        return {"dataset": "fashion-mnist", "source": str(fashion_mnist_dir)}
    if kind == "small_convnet":
        image_folder(directory / "images", {"round": 30, "square": 30, "stripe": 30}, shape=(32, 32, 3))
        return {"dataset": "images", "source": str(directory / "images"), "validation_size": 10}
    write_own_dir(directory / "idx", tiny_arrays())
    return {"dataset": "idx", "source": str(directory / "idx"), "validation_size": 50}


@pytest.fixture(scope="module", params=MODELS)
def trained(request, tmp_path_factory, fashion_mnist_dir, prefect_api) -> tuple[str, Path, dict]:
    """A run of the model through the flow, with per-example norms and every second step's weights."""
    kind, directory = request.param, tmp_path_factory.mktemp(request.param)
    parameters = data_parameters(kind, directory, fashion_mnist_dir) | RUN
    manifest = train_flow(**parameters, model=f"{EXAMPLES}:{kind}", storage=str(directory / "store"), run_name=kind)
    return kind, directory / "store" / "runs" / kind, manifest


def brute_force_norms(model, weights: dict, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[n, variables]: each example's gradient norm per variable, one eager tape per example on its own loss."""
    for variable in model.trainable_variables:
        variable.assign(weights[variable.path])
    norms = []
    for image, label in zip(images, labels):
        with tf.GradientTape() as tape:
            loss = per_example_loss(label[None], model(image[None], training=True))
        norms.append([np.linalg.norm(g.numpy().astype(np.float64)) for g in tape.gradient(loss, model.trainable_variables)])
    return np.array(norms)


def test_every_stored_per_example_norm_matches_brute_force(trained):
    kind, run, manifest = trained
    assert manifest["model"]["per_example"] == {"norms": True, "fallback": ["gru"] if kind == "row_gru" else [], "reason": None}
    images, labels, sample_ids = read_split(manifest["uris"]["train"])
    row_of = {int(i): n for n, i in enumerate(sample_ids)}
    samples, model = read_samples(run), rebuilt_model(manifest)
    for step in (1, 2, 4):  # steps whose weights (before the update) were stored
        rows = samples.filter(pc.field("step") == step)
        index = [row_of[int(i)] for i in rows.column("sample_id").to_numpy()]
        expected = brute_force_norms(model, gradient_arrays(run, step, field="weights"), images[index], labels[index])
        stored = np.stack(rows.column("layer_norms").to_numpy(zero_copy_only=False))
        np.testing.assert_allclose(stored, expected, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(rows.column("grad_norm").to_numpy(), np.sqrt((expected**2).sum(axis=1)), rtol=1e-3)


def test_verify_recomputes_a_snapshot(trained):
    _, run, _ = trained
    assert verify_snapshot(run)["max_relative_difference"] < 1e-4


def test_model_keras_scores_the_recorded_test_accuracy_in_a_fresh_process(trained):
    _, run, manifest = trained
    assert fresh_process_accuracy(run, manifest) == manifest["metrics"]["test_accuracy"]


@pytest.mark.parametrize("kind", MODELS)
def test_a_run_killed_mid_epoch_resumes_bit_identical(kind, tmp_path, fashion_mnist_dir):
    parameters = data_parameters(kind, tmp_path, fashion_mnist_dir) | RUN | {"epochs": 2, "checkpoint_every": 2, "deterministic": True}
    if kind == "small_convnet":  # its max pooling has no deterministic gradient under XLA
        parameters["jit_compile"] = False
    config = RunConfig(**parameters, model=f"{EXAMPLES}:{kind}", storage=str(tmp_path / "store")).validated()
    storage = Storage(config.storage)
    data = prepare(fetch_files(config.data, storage), storage, config.seed, config.validation_size)
    straight = train_model(config, data, "straight")

    checkpoint = storage.layout.run("killed").checkpoints / "checkpoint"
    worker = spawn_training(config, data, "killed", tmp_path)
    assert kill_when(worker, checkpoint.exists) == -signal.SIGKILL  # killed before it finished: 8 steps, a checkpoint every 2

    resumed = train_model(config, data, "killed")
    assert 0 < resumed.resumed_from < straight.steps == resumed.steps
    spec = ModelSpec(config.model)
    for a, b in zip(spec.load(straight.model_uri).trainable_variables, spec.load(resumed.model_uri).trainable_variables):
        assert np.array_equal(a.numpy(), b.numpy())
