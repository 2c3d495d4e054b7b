"""Per-example gradient norms and the noise estimates, checked against brute force: one tape per example.

The run is real (the compiled XLA step, k steps per call); the reference is plain
eager TensorFlow on the weights the run stored before each scheduled step.
"""

import keras
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import tensorflow as tf

from tapeline.cli import main
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


def brute_force(weights: dict[str, np.ndarray], images: np.ndarray, labels: np.ndarray) -> tuple[list[list[np.ndarray]], np.ndarray]:
    """Each example's own gradient of its own loss, one GradientTape per example, eagerly; and its logits [n, classes]."""
    model = build_model()
    for variable in model.trainable_variables:
        variable.assign(weights[variable.path])
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    gradients, logits = [], []
    for image, label in zip(images, labels):
        with tf.GradientTape() as tape:
            logits.append(model(image[None], training=True))
            loss = loss_fn(label[None], logits[-1])
        gradients.append([g.numpy().astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)])
    return gradients, np.concatenate(logits)


def test_every_stored_per_example_column_and_noise_estimate_matches_brute_force(run):
    directory, data, trained = run
    images, labels, sample_ids = read_split(data.uris["train"])
    by_id = {int(i): n for n, i in enumerate(sample_ids)}
    steps = read_steps(directory).sort_by("step")
    samples = read_samples(directory)
    checked = [1, *range(SNAPSHOT_EVERY, trained.steps + 1, SNAPSHOT_EVERY)]  # the steps whose weights were stored
    wrong = 0
    for step in checked:
        rows = samples.filter(pc.field("step") == step)
        ids = rows.column("sample_id").to_numpy()
        assert ids.tolist() == steps.column("sample_ids")[step - 1].as_py()
        index = [by_id[int(i)] for i in ids]
        per_example, logits = brute_force(gradient_arrays(directory, step, field="weights"), images[index], labels[index])

        layer_norms = np.array([[np.linalg.norm(g) for g in example] for example in per_example])
        np.testing.assert_allclose(np.stack(rows.column("layer_norms").to_numpy(zero_copy_only=False)), layer_norms, rtol=RTOL)
        np.testing.assert_allclose(rows.column("grad_norm").to_numpy(), np.sqrt((layer_norms**2).sum(axis=1)), rtol=RTOL)
        assert rows.column("label").to_numpy().tolist() == labels[index].tolist()

        # The prediction at that step: the argmax of the logits at the weights before it (a near tie may go either way).
        predicted = rows.column("predicted").to_numpy().astype(np.int64)
        chosen = logits[np.arange(len(predicted)), predicted]
        np.testing.assert_allclose(chosen, logits.max(axis=1), rtol=RTOL, atol=RTOL * np.abs(logits).max())
        assert rows.column("correct").to_numpy(zero_copy_only=False).tolist() == (predicted == labels[index]).tolist()

        # The label's margin and softmax probability, from the same logits.
        given = labels[index].astype(np.int64)
        label_logit = logits[np.arange(len(given)), given]
        others = np.where(np.eye(logits.shape[1], dtype=bool)[given], -np.inf, logits)
        np.testing.assert_allclose(rows.column("margin").to_numpy(), label_logit - others.max(axis=1), rtol=RTOL, atol=RTOL * np.abs(logits).max())
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        np.testing.assert_allclose(rows.column("p_label").to_numpy(), shifted[np.arange(len(given)), given] / shifted.sum(axis=1), rtol=RTOL, atol=1e-6)
        wrong += int((predicted != labels[index]).sum())

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
    assert 0 < wrong < sum(len(steps.column("sample_ids")[step - 1]) for step in checked)  # some predicted wrongly, some rightly


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


def cli_rows(capsys, run) -> list[list[str]]:
    """`tapeline samples RUN --top 200`, its rows split into columns (the tiny run's class names are single digits)."""
    assert main(["samples", str(run), "--top", "200"]) == 0
    return [line.split() for line in capsys.readouterr().out.splitlines()[1:]]


def test_samples_prints_the_predicted_class_beside_the_label(run, capsys):
    directory, _, _ = run
    ranking = rank_samples(directory, top=200).to_pylist()
    rows = cli_rows(capsys, directory)
    assert [row[1:5] for row in rows] == [[str(r["sample_id"]), str(r["label"]), str(r["latest_predicted"]), str(r["latest_step"])] for r in ranking]
    assert all(r["latest_correct"] == (r["latest_predicted"] == r["label"]) for r in ranking)
    assert any(not r["latest_correct"] for r in ranking) and any(r["latest_correct"] for r in ranking)


def test_a_run_written_before_the_predicted_column_still_ranks(run, tmp_path, capsys):
    """An older run's samples (history: never rewritten) read back with `predicted` null; everything else as before,
    and the CLI names the label of a right prediction, "?" for a wrong one."""
    directory, _, _ = run
    old = tmp_path / "old-run"
    for path in (directory / "samples").rglob("*.parquet"):
        target = old / path.relative_to(directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pq.read_table(path).drop_columns(["predicted"]), target)
    ranking, current = rank_samples(old, top=200), rank_samples(directory, top=200)
    assert ranking.column("latest_predicted").null_count == ranking.num_rows > 0
    assert ranking.drop_columns(["latest_predicted"]).equals(current.drop_columns(["latest_predicted"]))
    expected = [str(r["label"]) if r["latest_correct"] else "?" for r in current.to_pylist()]
    assert [row[3] for row in cli_rows(capsys, old)] == expected and "?" in expected
