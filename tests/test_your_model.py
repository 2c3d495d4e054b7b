"""--model: your own Keras model, checked before any stage, recorded, resumed, warm-started and loaded as trained."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from tapeline.cli import parse_train_args
from tapeline.data.shape import DataShape
from tapeline.errors import ConfigError
from tapeline.flows.train import main, train_flow
from tapeline.gradients.verify import verify_snapshot
from tapeline.model import ModelError, ModelSpec, check_model
from tapeline.registry.listing import model_registry, registry_lines
from tapeline.registry.warm_start import choose_warm_start
from tapeline.storage.root import Storage
from tapeline.training.loop import train_model
from tests.helpers import fresh_process_accuracy, tiny_arrays, tiny_prepared, write_idx_dir

EXAMPLES = Path(__file__).parents[1] / "examples" / "models.py"
MNIST_SHAPE = DataShape((28, 28, 1), tuple("0123456789"))

BAD_MODELS = """
import keras
from tapeline.model import cnn

def not_a_model(input_shape, num_classes):
    return "a model"

def twelve_outputs(input_shape, num_classes):
    return cnn(input_shape, 12)

def colour_only(input_shape, num_classes):
    return cnn((32, 32, 3), num_classes)

def frozen(input_shape, num_classes):
    inputs = keras.Input(input_shape, dtype="uint8")
    return keras.Model(inputs, keras.layers.Dense(num_classes, trainable=False)(keras.layers.Flatten()(inputs)))

def floats(input_shape, num_classes):
    inputs = keras.Input(input_shape)
    return keras.Model(inputs, keras.layers.Dense(num_classes)(keras.layers.Flatten()(inputs)))

def raises(input_shape, num_classes):
    raise ValueError("no such layer size")
"""


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "bad_models.py"
    path.write_text(BAD_MODELS)
    (path.parent / "broken.py").write_text("import no_such_package\n")
    (path.parent / "garbage.keras").write_bytes(b"not a zip")
    return path.parent


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module:build", "model module 'no_such_module' cannot be imported: ModuleNotFoundError: No module named 'no_such_module'"),
        ("{dir}/missing.py:build", "model file {dir}/missing.py does not exist"),
        ("{dir}/broken.py:build", "model file {dir}/broken.py cannot be imported: ModuleNotFoundError: No module named 'no_such_package'"),
        ("{dir}/bad_models.py:nope", "model '{dir}/bad_models.py:nope': {dir}/bad_models.py has no function nope"),
        ("{dir}/bad_models.py:not_a_model", "model '{dir}/bad_models.py:not_a_model' returned str, not a Keras model"),
        ("{dir}/bad_models.py:twelve_outputs", "returns 12 values per image; the data has 10 classes: return one logit per class"),
        ("{dir}/bad_models.py:colour_only", "does not take the data's images (28x28x1, uint8)"),
        ("{dir}/bad_models.py:floats", "declares its input as float32: the compiled step feeds it the data's images, keras.Input((28, 28, 1), dtype='uint8')"),
        ("{dir}/bad_models.py:frozen", "has no trainable variables: there is nothing to train"),
        ("{dir}/bad_models.py:raises", "failed to build for images (28, 28, 1) and 10 classes: ValueError: no such layer size"),
        ("{dir}/garbage.keras", "model file {dir}/garbage.keras does not load:"),
        ("just_a_name", "give package.module:function, path/to/file.py:function or a .keras file"),
    ],
)
def test_a_bad_model_is_one_line(bad_models, spec, message):
    spec, message = spec.format(dir=bad_models), message.format(dir=bad_models)
    with pytest.raises(ModelError) as raised:
        check_model(spec, MNIST_SHAPE, "float32")
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_a_bad_model_stops_the_run_before_anything_is_written(bad_models, tmp_path, capsys):
    storage = tmp_path / "store"
    flags = ["--dataset", "fashion-mnist", "--storage", str(storage), "--model", f"{bad_models}/bad_models.py:twelve_outputs"]
    assert main(parse_train_args(flags), "tapeline train") == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("tapeline train: error: model ") and "12 values per image" in line
    assert not storage.exists() or not any(storage.iterdir())


def test_every_build_names_the_variables_alike():
    spec = ModelSpec(f"{EXAMPLES}:simple_model")
    first, second = spec.build(MNIST_SHAPE), spec.build(MNIST_SHAPE)  # a second build in one process: no "conv2d_1"
    assert [v.path for v in first.trainable_variables] == [v.path for v in second.trainable_variables]
    assert first.trainable_variables[0].path == "simple_model/conv2d/kernel"


def test_a_seeded_build_has_its_seeds_weights_while_another_thread_draws_from_random():
    """In a flow run Prefect's threads draw from Python's global `random`, from which Keras takes each initializer's
    seed: two builds with one seed while a thread draws throughout have the weights of a build with none drawing."""
    spec, stop = ModelSpec(f"{EXAMPLES}:simple_model"), threading.Event()
    alone = spec.build(MNIST_SHAPE, seed=7)
    drawing = threading.Thread(target=lambda: [random.random() for _ in iter(stop.is_set, True)], daemon=True)
    drawing.start()
    try:
        builds = [spec.build(MNIST_SHAPE, seed=7) for _ in range(2)]
    finally:
        stop.set()
        drawing.join()
    for model in builds:
        assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(model.weights, alone.weights, strict=True))


@pytest.fixture(scope="module")
def simple_run(tmp_path_factory, prefect_api) -> tuple[Path, dict]:
    """The example's SimpleModel trained through the flow on a tiny IDX set."""
    root = tmp_path_factory.mktemp("simple")
    write_idx_dir(root / "source", tiny_arrays())
    storage = root / "store"
    manifest = train_flow(
        dataset="idx", source=str(root / "source"), storage=str(storage), run_name="simple", model=f"{EXAMPLES}:simple_model",
        epochs=1, validation_size=50, snapshot_every=5, snapshot_weights=True, per_example_norms=False,
    )  # fmt: skip
    return storage, manifest


def test_the_examples_simple_model_trains_and_is_recorded(simple_run):
    storage, manifest = simple_run
    model = manifest["model"]
    assert model["spec"] == f"{EXAMPLES}:simple_model" and len(model["architecture"]) == 16
    assert [v["name"] for v in model["variables"]] == [
        "simple_model/conv2d/kernel", "simple_model/conv2d/bias", "simple_model/dense/kernel",
        "simple_model/dense/bias", "simple_model/dense_1/kernel", "simple_model/dense_1/bias",
    ]  # fmt: skip
    assert model["parameters"] == 32 * 9 + 32 + 26 * 26 * 32 * 128 + 128 + 128 * 10 + 10
    assert manifest["dataset"]["image_shape"] == [28, 28, 1]
    assert verify_snapshot(storage / "runs" / "simple")["max_relative_difference"] < 1e-4
    (line,) = registry_lines(model_registry(Storage(str(storage))))
    assert line.endswith(f"model {EXAMPLES}:simple_model  checkpoints dropped")


def test_model_keras_loads_in_a_fresh_process_as_the_card_says(simple_run):
    storage, manifest = simple_run
    card = json.loads((storage / "runs" / "simple" / "model.json").read_text())
    assert card["input"]["shape"] == [None, 28, 28, 1] and card["output"]["shape"] == [None, 10]
    assert card["load"]["import"] == str(EXAMPLES)
    assert fresh_process_accuracy(storage / "runs" / "simple", manifest) == pytest.approx(manifest["metrics"]["test_accuracy"], abs=1e-9)


def test_a_warm_start_takes_only_a_model_with_the_same_variables(simple_run):
    storage, manifest = simple_run
    cnn_variables = [{"name": v.path, "shape": list(v.shape)} for v in ModelSpec().build(MNIST_SHAPE).trainable_variables]
    differs = "trained a model whose variable 1 is simple_model/conv2d/kernel 3x3x1x32; this model's is cnn/conv/kernel 3x3x1x32"
    with pytest.raises(ConfigError, match=f"warm_start_from 'simple': the run {differs}"):
        choose_warm_start(Storage(str(storage)), False, "simple", cnn_variables)
    choice = choose_warm_start(Storage(str(storage)), True, None, cnn_variables)  # the run is the champion
    assert choice.record("any training data")["from"] is None
    assert choice.reason == f"the champion, run simple, {differs}"
    assert choose_warm_start(Storage(str(storage)), True, None, manifest["model"]["variables"]).run_id == "simple"


def test_a_resume_refuses_a_model_that_changed(tmp_path):
    builder = tmp_path / "mine.py"
    builder.write_text("from tapeline.model import cnn\n\ndef build(input_shape, num_classes):\n    return cnn(input_shape, num_classes)\n")
    config, data = tiny_prepared(tmp_path, model=f"{builder}:build", epochs=1, validation_size=50, per_example_norms=False)
    train_model(config, data, "mine")  # leaves its checkpoint: a later call with the same run resumes from it
    builder.write_text(LINEAR)  # the user edits the file; the spec stays the same
    del sys.modules["mine"]  # as a new process would, import the edited file
    with pytest.raises(ConfigError, match="trained with other values of architecture: use a new run_name"):
        train_model(dataclasses.replace(config, epochs=2), data, "mine")


LINEAR = """
import keras

def build(input_shape, num_classes):
    return keras.Sequential([keras.Input(input_shape, dtype="uint8"), keras.layers.Flatten(), keras.layers.Dense(num_classes)])
"""


BATCH_NORM = """
import keras

def build(input_shape, num_classes):
    inputs = keras.Input(input_shape, dtype="uint8")
    x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(inputs))
    x = keras.layers.Flatten()(keras.layers.BatchNormalization()(x))
    return keras.Model(inputs, keras.layers.Dense(num_classes)(x))
"""


def test_batch_normalization_trains_with_per_example_norms_off_and_one_line(tmp_path, capsys):
    builder = tmp_path / "normed.py"
    builder.write_text(BATCH_NORM)
    config, data = tiny_prepared(tmp_path, model=f"{builder}:build", epochs=1, validation_size=50)
    trained = train_model(config, data, "normed")
    reason = "batch_normalization (BatchNormalization) normalises each example by its batch's statistics, so an example's gradient depends on the others"
    assert f"per-example gradient norms off: {reason}" in capsys.readouterr().out.splitlines()
    assert trained.model["per_example"] == {"norms": False, "fallback": [], "reason": reason}
    assert not (Path(config.storage) / "runs" / "normed" / "samples").exists()
    flags = [
        "--dataset",
        "idx",
        "--source",
        str(tmp_path / "source"),
        "--storage",
        str(tmp_path / "other"),
        "--model",
        f"{builder}:build",
        "--validation-size",
        "50",
    ]
    assert main(parse_train_args([*flags, "--devices", "2"]), "tapeline train") == 2
    refused = f"tapeline train: error: --devices 2 would train another model than one device: {reason}; train on one device"
    assert capsys.readouterr().err.splitlines() == [refused]


def test_deterministic_xla_refuses_a_max_pooling_model_before_any_stage(tmp_path, capsys):
    flags = ["--dataset", "fashion-mnist", "--storage", str(tmp_path), "--model", f"{EXAMPLES}:small_convnet", "--deterministic"]
    assert main(parse_train_args(flags), "tapeline train") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"tapeline train: error: model '{EXAMPLES}:small_convnet': max_pooling2d (MaxPooling2D) has no deterministic gradient "
        "under XLA; with --deterministic, add --no-jit-compile"
    ]


def test_a_keras_file_gives_its_architecture_and_starting_weights(tmp_path):
    saved = ModelSpec(f"{EXAMPLES}:small_convnet").build(DataShape((32, 32, 3), ("a", "b")))
    saved.save(tmp_path / "start.keras")
    model = check_model(str(tmp_path / "start.keras"), DataShape((32, 32, 3), ("a", "b")), "float32")
    assert [v.path for v in model.trainable_variables] == [v.path for v in saved.trainable_variables]
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(model.trainable_variables, saved.trainable_variables))
    with pytest.raises(ModelError, match="a .keras file computes in the precision it was saved with; train it with --precision float32"):
        check_model(str(tmp_path / "start.keras"), DataShape((32, 32, 3), ("a", "b")), "mixed_bfloat16")


def test_a_model_of_ones_own_trains_in_mixed_precision_with_exact_norms(tmp_path):
    config, data = tiny_prepared(tmp_path, model=f"{EXAMPLES}:simple_model", epochs=1, validation_size=50, precision="mixed_bfloat16")
    trained = train_model(config, data, "mixed")
    assert trained.model["per_example"]["norms"] and np.isfinite(trained.epochs[-1]["train_loss"])
    assert trained.model["variables"][0] == {"name": "simple_model/conv2d/kernel", "shape": [3, 3, 1, 32]}  # float32 variables
