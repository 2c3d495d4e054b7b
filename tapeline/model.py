"""The model: built in one place from its spec and the data's shape, and its loss.

A spec names a builder, called as `builder(input_shape, num_classes)`, that returns a
Keras model taking the dataset's images as stored (uint8, `input_shape`) and returning
`num_classes` logits: `package.module:function`, `path/to/file.py:function`, or a
`.keras` file (its architecture and initial weights). The default, `tapeline.model:cnn`,
is the tf.GradientTape example's CNN. Training, resume, verify and evaluation all
build through `build` from what run.json records (the spec, the data's shape, the
precision), as nanoGPT rebuilds its model from the arguments saved in its checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import importlib
import importlib.util
import json
import random
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from tapeline.config import DEFAULT_MODEL
from tapeline.data.shape import DataShape
from tapeline.errors import ConfigError

INPUT_DTYPE = "uint8"  # raw pixels: the model rescales them itself


class ModelError(ConfigError):
    """The model spec does not give a model for this data: bad input, nothing was done."""


def cnn(input_shape, num_classes) -> keras.Model:
    """Conv2D 32 3x3 relu -> Flatten -> Dense 128 relu -> Dense `num_classes` logits: the example's model.

    It takes raw uint8 pixels: `Rescaling(1/255)` is the one place where pixels become
    floats in [0, 1], so training, evaluation and anyone loading the saved `.keras`
    file feed it the bytes the Parquet splits hold. The activations are layers of their
    own; the computation is the example's. Under a mixed precision policy the layers
    compute in 16 bits; the logits stay float32 so the softmax and loss keep their range.
    """
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, dtype=INPUT_DTYPE, name="image"),
            keras.layers.Rescaling(1.0 / 255, name="normalize"),
            keras.layers.Conv2D(32, 3, name="conv"),
            keras.layers.ReLU(name="conv_relu"),
            keras.layers.Flatten(name="flatten"),
            keras.layers.Dense(128, name="dense"),
            keras.layers.ReLU(name="dense_relu"),
            keras.layers.Dense(num_classes, name="logits", dtype="float32"),
        ],
        name="cnn",
    )


def build_model(precision: str = "float32", shape: DataShape | None = None, spec: str = DEFAULT_MODEL, seed: int | None = None) -> keras.Model:
    """The model of `spec` for data of `shape` (default: 28x28 grey images, ten classes) under `precision`; with a
    `seed`, the initial weights a run of that seed starts from."""
    return ModelSpec(spec).build(shape or DataShape((28, 28, 1), tuple(str(label) for label in range(10))), precision, seed)


@dataclass(frozen=True)
class ModelSpec:
    """A model spec as `--model` takes it; `build` makes its model for some data."""

    spec: str = DEFAULT_MODEL

    @property
    def is_file(self) -> bool:
        return self.spec.endswith(".keras")

    def build(self, shape: DataShape, precision: str = "float32", seed: int | None = None) -> keras.Model:
        """A new model for `shape` under `precision`, its layers named the same in every build and every process; with
        a `seed`, its initial weights are that seed's in any process, whatever its other threads do."""
        with _fresh_names(), _dtype_policy(precision), _seeded_defaults(seed):
            model = _load_keras_file(self.spec) if self.is_file else self._call_builder(shape)
        if not isinstance(model, keras.Model):
            raise ModelError(f"model {self.spec!r} returned {type(model).__name__}, not a Keras model")
        return model

    def imports(self) -> str | None:
        """What a fresh process imports before `keras.models.load_model` can load this spec's saved model: the
        builder's module (its file, for a file spec), or None when only Keras' own layers are needed."""
        if self.is_file or self.spec == DEFAULT_MODEL:
            return None
        return self.spec.rpartition(":")[0]

    def load(self, path) -> keras.Model:
        """The `.keras` file this spec's model was saved to, loaded in safe mode (a model file is data: it runs no
        code), once the builder's module is imported so that the classes it registers are known."""
        if self.imports():
            self.builder()
        return keras.models.load_model(path, safe_mode=True)

    def _call_builder(self, shape: DataShape) -> keras.Model:
        builder = self.builder()
        try:
            return builder(shape.image_shape, shape.num_classes)
        except Exception as error:  # the user's code: whatever it raises is their model's failure
            raise ModelError(f"model {self.spec!r} failed to build for images {shape.image_shape} and {shape.num_classes} classes: {_reason(error)}") from None

    def builder(self) -> Callable:
        """The builder function the spec names, imported."""
        where, colon, name = self.spec.rpartition(":")
        if not colon or not where or not name.isidentifier():
            raise ModelError(f"model {self.spec!r}: give package.module:function, path/to/file.py:function or a .keras file")
        module = _import_file(where) if where.endswith(".py") else _import_module(where)
        builder = getattr(module, name, None)
        if not callable(builder):
            raise ModelError(f"model {self.spec!r}: {where} has no function {name}")
        return builder


def check_model(spec: str, shape: DataShape, precision: str) -> keras.Model:
    """The spec's model for this data, once it is known to take its images and give one logit per class (ModelError,
    one line, when not): built and called on two blank images, before any stage."""
    if ModelSpec(spec).is_file and precision != "float32":
        raise ModelError(f"model {spec!r}: a .keras file computes in the precision it was saved with; train it with --precision float32")
    model = ModelSpec(spec).build(shape, precision)
    inputs = getattr(model, "inputs", None) or ()
    if len(inputs) != 1 or inputs[0].dtype != INPUT_DTYPE:
        declared = f"declares {len(inputs)} inputs" if len(inputs) != 1 else f"declares its input as {inputs[0].dtype}"
        raise ModelError(f"model {spec!r} {declared}: the compiled step feeds it the data's images, keras.Input({shape.image_shape}, dtype='uint8')")
    try:
        logits = model(np.zeros((2, *shape.image_shape), INPUT_DTYPE), training=False)
    except Exception as error:  # the user's model: whatever it raises means it does not take these images
        raise ModelError(f"model {spec!r} does not take the data's images ({_shape(shape.image_shape)}, uint8): {_reason(error)}") from None
    if tuple(logits.shape) != (2, shape.num_classes):
        raise ModelError(
            f"model {spec!r} returns {_shape(logits.shape[1:])} values per image; the data has {shape.num_classes} classes: return one logit per class"
        )
    if not model.trainable_variables:
        raise ModelError(f"model {spec!r} has no trainable variables: there is nothing to train")
    return model


# Layers whose gradient XLA has no deterministic implementation of (TensorFlow 2.21): --deterministic needs them
# compiled without XLA.
NOT_DETERMINISTIC_UNDER_XLA = (keras.layers.MaxPooling1D, keras.layers.MaxPooling2D, keras.layers.MaxPooling3D)


def check_determinism(spec: str, model: keras.Model, deterministic: bool, jit_compile: bool) -> None:
    """ModelError when --deterministic asks XLA for a gradient it has no deterministic implementation of."""
    if not (deterministic and jit_compile):
        return
    layer = next((layer for layer in model._flatten_layers() if isinstance(layer, NOT_DETERMINISTIC_UNDER_XLA)), None)
    if layer is not None:
        raise ModelError(
            f"model {spec!r}: {layer.name} ({type(layer).__name__}) has no deterministic gradient under XLA; with --deterministic, add --no-jit-compile"
        )


def model_record(spec: str, model: keras.Model) -> dict:
    """run.json's `model`: the spec, a digest of the architecture, the parameter count, the trainable variables in order."""
    variables = [{"name": v.path, "shape": list(v.shape)} for v in model.trainable_variables]
    return {"spec": spec, "architecture": architecture_digest(model), "parameters": int(model.count_params()), "variables": variables}


def architecture_digest(model: keras.Model) -> str:
    """The first 16 hex digits of a SHA-256 over each layer's class and configuration and each trainable variable's
    name and shape: the same for every build of one spec on one data shape, different when the model differs."""
    layers = [(type(layer).__name__, _config(layer)) for layer in model._flatten_layers(include_self=True)]
    variables = [(v.path, list(v.shape)) for v in model.trainable_variables]
    return hashlib.sha256(json.dumps([layers, variables], sort_keys=True, default=str).encode()).hexdigest()[:16]


def per_example_loss(labels, logits):
    """Each example's loss: the cross-entropy of its label under the softmax of its logits, in float32."""
    return keras.losses.sparse_categorical_crossentropy(labels, keras.ops.cast(logits, "float32"), from_logits=True)


def mean_loss(labels, logits):
    """A batch's loss: the mean of its examples' (what the optimizer minimises, and what evaluation reports)."""
    return keras.ops.mean(per_example_loss(labels, logits))


def _config(layer) -> dict | None:
    try:
        return layer.get_config()
    except NotImplementedError:  # a subclassed model or layer without get_config: its class and variables say it
        return None


@contextlib.contextmanager
def _fresh_names():
    """Keras names layers from a counter per process ("dense", then "dense_1"): build with a fresh one, so that a
    rebuilt model's variables have the names the run recorded, whatever was built before it in the process."""
    from keras.src.backend.common import global_state

    before = global_state.get_global_attribute("object_name_uids")
    global_state.set_global_attribute("object_name_uids", collections.defaultdict(int))
    try:
        yield
    finally:
        global_state.set_global_attribute("object_name_uids", before)


@contextlib.contextmanager
def _seeded_defaults(seed: int | None):
    """Keras draws the seed of every initializer given none from Python's global `random`, which any other thread of
    the process draws from too (Prefect's, during a flow run): a build's weights then depend on timing. With a seed,
    the build draws from a generator of its own, which gives what the global one gives after `random.seed(seed)`."""
    if seed is None:
        yield
        return
    from keras.src.random import seed_generator

    shared = seed_generator.python_random
    seed_generator.python_random = random.Random(seed)
    try:
        yield
    finally:
        seed_generator.python_random = shared


@contextlib.contextmanager
def _dtype_policy(precision: str):
    """Layers built inside compute under `precision` (Keras' global dtype policy); variables stay float32."""
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(before)


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except Exception as error:  # ImportError, or whatever the module raises as it runs
        raise ModelError(f"model module {name!r} cannot be imported: {_reason(error)}") from None


def _import_file(path: str):
    """The module of a Python file, imported under its file name (its directory first on the path, for its own imports)."""
    file = Path(path).expanduser().resolve()
    if not file.is_file():
        raise ModelError(f"model file {path} does not exist")
    name = file.stem
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(file):
        return sys.modules[name]
    loader = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module
    try:
        loader.loader.exec_module(module)
    except Exception as error:
        del sys.modules[name]
        raise ModelError(f"model file {path} cannot be imported: {_reason(error)}") from None
    return module


def _load_keras_file(spec: str) -> keras.Model:
    """The model of a `.keras` file, a local path or any fsspec URI (s3://…): its architecture and weights."""
    import fsspec

    try:
        with fsspec.open(spec, "rb") as source, tempfile.TemporaryDirectory() as directory:
            local = Path(directory) / "model.keras"
            local.write_bytes(source.read())
            return keras.models.load_model(local, compile=False)
    except Exception as error:  # a missing, truncated or foreign file, or layers this process cannot import
        raise ModelError(f"model file {spec} does not load: {_reason(error)}") from None


def _shape(shape) -> str:
    return "x".join(str(n) for n in shape)


def _reason(error: Exception) -> str:
    return f"{type(error).__name__}: {error}".splitlines()[0][:300]
