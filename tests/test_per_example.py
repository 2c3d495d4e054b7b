"""Per-example gradient norms and the noise estimates, checked against brute force: one tape per example.

The run is real (the compiled XLA step, k steps per call); the reference is plain
eager TensorFlow on the weights the run stored before each scheduled step.
"""

import keras
import numpy as np
import pyarrow.compute as pc
import pytest
import tensorflow as tf

from tapeline.data.splits import read_split
from tapeline.gradients.export import publish_gradients
from tapeline.model import build_model
from tapeline.reader import gradient_arrays, rank_samples, read_samples, read_steps
from tapeline.storage.root import Storage
from tapeline.training.loop import train_model

BATCH, SNAPSHOT_EVERY, RTOL = 16, 4, 1e-3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.helpers import tiny_prepared

    root = tmp_path_factory.mktemp("per-example")
    config, data = tiny_prepared(
        root, n_train=200, epochs=1, batch_size=BATCH, seed=5, validation_size=20, snapshot_every=SNAPSHOT_EVERY, snapshot_weights=True
    )
    trained = train_model(config, data, "per-example")
    publish_gradients(Storage(config.storage), trained)  # the export stage: snapshots are read through its manifest
    return root / "store" / "runs" / "per-example", data, trained


def brute_force(weights: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray) -> list[list[np.ndarray]]:
    """Each example's own gradient of its own loss, one GradientTape per example, eagerly."""
    model = build_model()
    for variable in model.trainable_variables:
        variable.assign(weights[variable.path])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    gradients = []
    for image, label in zip(images, labels):
        with tf.GradientTape() as tape:
            loss = loss_fn(label[None], model(image[None], training=True))
        gradients.append([g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)])
    return gradients


def test_every_stored_per_example_norm_and_noise_estimate_matches_brute_force(run):
    directory, data, trained = run
    images, labels, sample_ids = read_split(data.uris["train"])
    by_id = {int(i): n for n, i in enumerate(sample_ids)}
    steps = read_steps(directory).sort_by("step")
    samples = read_samples(directory)
    checked = [1, *range(SNAPSHOT_EVERY, trained.steps + 1, SNAPSHOT_EVERY)]  # the steps whose weights were stored
    for step in checked:
        rows = samples.filter(pc.field("step") == step)
        ids = rows.column("sample_id").to_numpy()
        assert ids.tolist() == steps.column("sample_ids")[step - 1].as_py()
        index = [by_id[int(i)] for i in ids]
        per_example = brute_force(gradient_arrays(directory, step, field="weights"), images[index], labels[index])

        layer_norms = np.array([[np.linalg.norm(g) for g in example] for example in per_example])
        np.testing.assert_allclose(np.stack(rows.column("layer_norms").to_numpy(zero_copy_only=False)), layer_norms, rtol=RTOL)
        np.testing.assert_allclose(rows.column("grad_norm").to_numpy(), np.sqrt((layer_norms**2).sum(axis=1)), rtol=RTOL)
        assert rows.column("label").to_numpy().tolist() == labels[index].tolist()

        # The noise estimates, from the brute-force per-example gradients (McCandlish et al. 2018, appendix A).
        b = len(per_example)
        m = np.mean([sum((g**2).sum() for g in example) for example in per_example])
        batch_gradient = [np.mean([example[v] for example in per_example], axis=0) for v in range(len(per_example[0]))]
        g2 = sum((g**2).sum() for g in batch_gradient)
        variance, signal = (m - g2) / (1 - 1 / b), (b * g2 - m) / (b - 1)
        stored = {name: steps.column(name)[step - 1].as_py() for name in ("grad_variance", "grad_signal", "grad_noise_scale")}
        # Each estimate is a difference of two terms of the size of m; its error is relative to them.
        assert stored["grad_variance"] == pytest.approx(variance, rel=RTOL, abs=RTOL * m)
        assert stored["grad_signal"] == pytest.approx(signal, rel=RTOL, abs=RTOL * m)
        assert stored["grad_noise_scale"] == pytest.approx(variance / signal, rel=10 * RTOL * m / abs(signal))
        # The stored batch gradient is the mean of the per-example ones.
        stored_gradient = gradient_arrays(directory, step)
        for variable, expected in zip(trained.variables, batch_gradient):
            np.testing.assert_allclose(stored_gradient[variable], expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


def test_samples_cover_every_example_of_every_step_once(run):
    directory, data, trained = run
    samples = read_samples(directory, columns=["step", "sample_id", "correct", "loss"])
    steps = read_steps(directory, columns=["step", "sample_ids"])
    assert samples.num_rows == sum(len(ids) for ids in steps.column("sample_ids").to_pylist())
    assert sorted(samples.column("sample_id").to_pylist()) == sorted(read_split(data.uris["train"])[2].tolist())  # one epoch
    assert pc.all(pc.is_finite(samples.column("loss"))).as_py()


def test_ranking_puts_the_largest_mean_norm_first(run):
    directory, _, _ = run
    ranking = rank_samples(directory, top=10)
    assert ranking.num_rows == 10
    norms = ranking.column("mean_grad_norm").to_numpy()
    assert (np.diff(norms) <= 0).all()
    samples = read_samples(directory, columns=["sample_id", "grad_norm"])
    top = samples.filter(pc.field("sample_id") == ranking.column("sample_id")[0])
    assert norms[0] == pytest.approx(pc.mean(top.column("grad_norm")).as_py(), rel=1e-6)
    assert norms[0] == pytest.approx(pc.max(samples.column("grad_norm")).as_py(), rel=1e-6)  # one epoch: seen once each
