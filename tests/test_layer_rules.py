"""Each per-example rule (tapeline/gradients/layer_rules.py) against brute force: one tape per example on its own loss.

The stored computation is the step's (the tapped forward pass, one `tape.gradient` of the batch's mean loss, the
rules), without XLA; the compiled step itself runs on the example models at the end.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from examples.models import row_gru, simple_model, small_convnet
from tapeline.gradients.layer_rules import FALLBACK, RULES
from tapeline.gradients.per_example import per_example_plan
from tapeline.gradients.schema import EXAMPLE_COLUMNS
from tapeline.model import mean_loss, per_example_loss
from tapeline.training.steps import make_train_step

BATCH, CLASSES, RTOL = 4, 3, 1e-3
layers = keras.layers


def stored(model, x, y) -> np.ndarray:
    """[B, variables]: the plan's squared norms, as the step computes them."""
    plan = per_example_plan(model)

    @tf.function
    def norms(x, y):
        with tf.GradientTape() as tape:
            logits, taps = plan.tapped(x, training=True)
            loss = mean_loss(y, logits)
        return plan.squared_norms(taps, tape.gradient(loss, taps.targets), tf.cast(tf.shape(y)[0], tf.float32))

    return norms(x, y).numpy()


def brute_force(model, x, y) -> np.ndarray:
    """[B, variables]: each example's own gradient of its own loss, one tape per example, its squared norm per variable."""
    rows = []
    for i in range(len(y)):
        example = tf.nest.map_structure(lambda t, i=i: t[i : i + 1], x)
        with tf.GradientTape() as tape:
            loss = per_example_loss(y[i : i + 1], model(example, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
        rows.append([np.sum(np.square(tf.convert_to_tensor(g).numpy().astype(np.float64))) for g in gradients])
    return np.array(rows)


def assert_close(actual: np.ndarray, expected: np.ndarray):
    """Within RTOL of brute force, each variable's column (a ReLU can zero an entry: 1e-6 of its column's largest)."""
    assert (expected > 0).any(axis=0).all()  # every variable has a gradient to check
    for column, (a, e) in enumerate(zip(actual.T, expected.T)):
        np.testing.assert_allclose(a, e, rtol=RTOL, atol=1e-6 * e.max(), err_msg=f"variable {column}")


def assert_matches(model, x, y):
    assert_close(stored(model, x, y), brute_force(model, x, y))


def sequential(shape, *stack, dtype="float32"):
    return keras.Sequential([keras.Input(shape, dtype=dtype), *stack, layers.Flatten(), layers.Dense(CLASSES)])


def random(shape, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=(BATCH, *shape)).astype(np.float32))


def labels(seed=1):
    return tf.constant(np.random.default_rng(seed).integers(0, CLASSES, BATCH))


def rules_taken(model) -> dict[str, str]:
    return {u.layer.name: "fallback" if u.rule is FALLBACK else type(u.layer).__name__ for u in per_example_plan(model).units}


def test_dense_on_features_and_on_sequences_by_gram_and_by_per_example_gradient():
    keras.utils.set_random_seed(0)
    # [B, 5, 4] -> 8: T² = 25 < 32, the Gram form; [B, 5, 8] -> 2: 25 > 16, the example's gradient; then features.
    model = sequential((5, 4), layers.Dense(8, activation="relu"), layers.Dense(2, use_bias=False))
    assert rules_taken(model) == {layer.name: "Dense" for layer in model.layers if layer.trainable_variables}
    assert_matches(model, random((5, 4)), labels())


@pytest.mark.parametrize(
    "shape, stack",
    [
        ((12, 4), [layers.Conv1D(6, 3, strides=2, padding="same", groups=2, activation="relu"), layers.Conv1D(4, 2, padding="causal", dilation_rate=2)]),
        ((9, 8, 4), [layers.Conv2D(6, 3, strides=(2, 1), padding="same", groups=2, activation="relu"), layers.Conv2D(4, (2, 3), dilation_rate=2)]),
        ((9, 9, 3), [layers.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, activation="tanh"), layers.DepthwiseConv2D(2, dilation_rate=2)]),
        ((8, 8, 3), [layers.SeparableConv2D(5, 3, padding="same", depth_multiplier=2, activation="relu"), layers.SeparableConv2D(4, 2, strides=2)]),
    ],
    ids=["conv1d", "conv2d", "depthwise", "separable"],
)
def test_convolutions_with_strides_padding_dilation_and_groups(shape, stack):
    keras.utils.set_random_seed(0)
    model = sequential(shape, *stack)
    assert set(rules_taken(model).values()) == {type(stack[0]).__name__, "Dense"}
    assert_matches(model, random(shape), labels())


def test_embedding_with_repeated_ids():
    keras.utils.set_random_seed(0)
    model = sequential((6,), layers.Embedding(4, 5), dtype="int32")
    ids = tf.constant(np.random.default_rng(0).integers(0, 4, (BATCH, 6)), tf.int32)  # 6 positions, 4 rows: repeats
    assert rules_taken(model)[model.layers[0].name] == "Embedding"
    assert_matches(model, ids, labels())


@pytest.mark.filterwarnings("ignore:You passed `rms_scaling=True`")
def test_layer_normalization_over_one_axis_two_axes_and_rms():
    keras.utils.set_random_seed(0)
    stack = [layers.Dense(6), layers.LayerNormalization(), layers.LayerNormalization(axis=[1, 2], epsilon=0.1), layers.LayerNormalization(rms_scaling=True)]
    model = sequential((4, 5), *stack)
    for layer in stack[1:]:  # not the identity at initialisation: γ, β random
        layer.set_weights([np.random.default_rng(2).normal(size=w.shape) for w in layer.get_weights()])
    assert list(rules_taken(model).values()).count("LayerNormalization") == 3
    assert_matches(model, random((4, 5)), labels())


def test_einsum_dense():
    keras.utils.set_random_seed(0)
    stack = [layers.EinsumDense("abc,cd->abd", (4, 5), bias_axes="d", activation="relu"), layers.EinsumDense("abd,bde->ae", 3, bias_axes="e")]
    model = keras.Sequential([keras.Input((4, 6)), *stack])
    assert set(rules_taken(model).values()) == {"EinsumDense"}
    assert_matches(model, random((4, 6)), labels())


class Affine(layers.Layer):
    """A custom layer with variables of its own: x·w + b, element-wise."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=input_shape[-1:], initializer="random_normal")
        self.b = self.add_weight(shape=input_shape[-1:], initializer="random_normal")

    def call(self, x):
        return x * self.w + self.b


def test_the_general_fallback_for_a_gru_and_a_custom_layer():
    keras.utils.set_random_seed(0)
    model = sequential((5, 3), Affine(name="affine"), layers.GRU(4, return_sequences=True, name="gru"))
    plan = per_example_plan(model)
    assert plan.fallback == ("affine", "gru")
    assert plan.note() == "per-example norms: affine, gru by the general fallback (its own call, differentiated per example)"
    assert_matches(model, random((5, 3)), labels())


def test_a_layer_called_twice_sums_both_calls():
    """Shared weights, Functional: a Dense, a convolution and a custom layer (the fallback), each called on two inputs."""
    keras.utils.set_random_seed(0)
    left, right = keras.Input((6, 6, 2)), keras.Input((6, 6, 2))
    conv, affine, dense = layers.Conv2D(3, 3, activation="relu"), Affine(), layers.Dense(4, activation="relu")
    branches = [dense(layers.Flatten()(affine(conv(x)))) for x in (left, right)]
    model = keras.Model([left, right], layers.Dense(CLASSES)(layers.Concatenate()(branches)))
    assert sorted(rules_taken(model).values()) == ["Conv2D", "Dense", "Dense", "fallback"]
    assert_matches(model, [random((6, 6, 2)), random((6, 6, 2), seed=3)], labels())


class Residual(keras.Model):
    """A subclassed model whose block (a layer of sublayers, no variables of its own) holds two rule layers."""

    def __init__(self):
        super().__init__()
        self.embed = layers.Dense(8)
        self.norm = layers.LayerNormalization()
        self.head = layers.Dense(CLASSES)

    def call(self, x):
        h = self.embed(x)
        return self.head(self.norm(h + tf.nn.relu(h)))


def test_subclassed_model():
    keras.utils.set_random_seed(0)
    model = Residual()
    x = random((5,))
    model(x)
    assert set(rules_taken(model).values()) == {"Dense", "LayerNormalization"}
    assert_matches(model, x, labels())


def test_batch_normalization_makes_per_example_norms_undefined_in_one_line():
    model = sequential((4,), layers.Dense(3), layers.BatchNormalization(name="bn"))
    reason = per_example_plan(model).unsupported
    assert reason == "bn (BatchNormalization) normalises each example by its batch's statistics, so an example's gradient depends on the others"
    with pytest.raises(ValueError, match="not defined for this model: bn .*--no-per-example-norms"):
        make_train_step(model, keras.optimizers.Adam(), keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy())
    frozen = sequential((4,), layers.Dense(3), layers.BatchNormalization(trainable=False))  # inference mode: per example
    assert per_example_plan(frozen).unsupported is None


class OwnWeight(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = layers.Dense(CLASSES)
        self.temperature = self.add_weight(shape=(), initializer="ones", name="temperature")

    def call(self, x):
        return self.dense(x) / self.temperature


def test_a_variable_no_rule_covers_is_a_clear_error():
    model = OwnWeight()
    model(random((3,)))
    with pytest.raises(ValueError, match="per-example norms: the model's own variables .*temperature are in no layer$"):
        per_example_plan(model)


def test_every_registered_rule_is_tested_here():
    source = open(__file__).read()
    assert [kind.__name__ for kind in RULES if f"layers.{kind.__name__}(" not in source] == []


@pytest.mark.parametrize("build, shape", [(simple_model, (28, 28, 1)), (small_convnet, (32, 32, 3)), (row_gru, (28, 28, 1))])
def test_the_compiled_step_on_the_example_models(build, shape):
    """The real step (XLA) returns each example's squared norms at the weights it trained from."""
    keras.utils.set_random_seed(0)
    model = build(shape, 10)
    rng = np.random.default_rng(0)
    x, y = tf.constant(rng.integers(0, 256, (BATCH, *shape), dtype=np.uint8)), tf.constant(rng.integers(0, 10, BATCH, dtype=np.uint8))
    expected = brute_force(model, x, y)
    step = make_train_step(model, keras.optimizers.Adam(1e-3), keras.metrics.Mean(), keras.metrics.SparseCategoricalAccuracy(), jit_compile=True)
    _, _, examples = step(x, y)
    assert_close(examples.numpy()[:, len(EXAMPLE_COLUMNS) :], expected)
