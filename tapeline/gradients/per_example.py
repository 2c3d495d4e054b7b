"""Per-example gradient norms inside the compiled step, without forming per-example gradients.

For a layer y = a·W + b, example i's own gradient of its loss ℓᵢ is the outer
product aᵢᵀδᵢ, with δᵢ = ∂ℓᵢ/∂yᵢ: its norm is ‖aᵢ‖·‖δᵢ‖, and the bias's is ‖δᵢ‖.
Convolutions, embeddings, normalisations have rules of the same kind
(tapeline/gradients/layer_rules.py); any other layer with variables takes a general
fallback. The δ come from the tape that already differentiates the batch loss: the
tapped tensors are extra targets of the one `tape.gradient`, scaled back from the batch
mean to each example's own loss.

    plan = per_example_plan(model)        # once, before the step is traced
    plan.unsupported                      # a one-line reason, or None
    logits, taps = plan.tapped(x, training=True)       # inside the GradientTape
    ... tape.gradient(loss, [*variables, *taps.targets])
    plan.squared_norms(taps, target_gradients, scale)  # [B, variables]

From these norms and the batch gradient's, the host estimates the gradient noise of
each step (tapeline/gradients/noise.py).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import keras
import tensorflow as tf

from tapeline.gradients.layer_rules import COUPLING, FALLBACK, OPAQUE, RULES, Call, Rule
from tapeline.gradients.schema import EXAMPLE_COLUMNS


@dataclass(frozen=True)
class Unit:
    """A layer whose variables one rule covers, and their columns in the model's trainable variables."""

    layer: keras.layers.Layer
    rule: Rule
    columns: tuple[int, ...]


@dataclass
class Taps:
    """What one tapped forward pass recorded: each call of a unit's layer, in call order."""

    batch_size: tf.Tensor
    calls: list[tuple[int, Call]] = field(default_factory=list)  # (unit index, call)
    values: dict[int, tuple] = field(default_factory=dict)  # unit index -> its variables' values, read before the forward pass

    @property
    def targets(self) -> list[tf.Tensor]:
        """The tensors whose gradients `squared_norms` needs, for the step's one `tape.gradient`."""
        return [t for _, call in self.calls for t in call.targets]


class PerExamplePlan:
    """Which rule computes each example's squared gradient norm for each of the model's trainable variables.

    `unsupported`: a one-line reason per-example norms are not defined for this model (a layer that couples
    the batch's examples), or None. `fallback`: the names of the layers that take the general fallback.
    """

    def __init__(self, model: keras.Model, units: list[Unit], unsupported: str | None):
        self.model, self.units, self.unsupported = model, units, unsupported
        self.fallback = tuple(u.layer.name for u in units if u.rule is FALLBACK)
        self._lock, self._recording, self._entered = threading.Lock(), {}, 0  # thread id -> Taps: replicas trace on threads of their own

    def note(self) -> str | None:
        """The one human line about how the norms are computed, when some layer takes the fallback; else None."""
        if not self.fallback:
            return None
        return f"per-example norms: {', '.join(self.fallback)} by the general fallback (its own call, differentiated per example)"

    def tapped(self, x, training: bool) -> tuple[tf.Tensor, Taps]:
        """(outputs, taps): `model(x, training)`, the same computation, recording each unit's calls.

        Each unit's layer has its `call` wrapped for the duration of this call only (tracing happens once per
        tf.function, so this costs nothing per step).
        """
        if self.unsupported:
            raise ValueError(f"per-example norms: {self.unsupported}")
        values = {i: tuple(tf.identity(v) for v in u.layer.trainable_variables) for i, u in enumerate(self.units) if u.rule.reads_variables}
        taps = Taps(batch_size=tf.shape(tf.nest.flatten(x)[0])[0], values=values)
        with self._installed():
            self._recording[threading.get_ident()] = taps
            try:
                outputs = self.model(x, training=training)
            finally:
                del self._recording[threading.get_ident()]
        return outputs, taps

    def squared_norms(self, taps: Taps, target_gradients: list, per_example_scale: tf.Tensor) -> tf.Tensor:
        """[B, variables] float32: each example's squared gradient norm per variable, in `model.trainable_variables`' order.

        `target_gradients`: the tape's gradients, of the loss it differentiated, at `taps.targets`;
        `per_example_scale` turns them into each example's own (B for a batch-mean loss, divided by the
        loss scale when there is one).
        """
        gradients = iter(target_gradients)
        by_unit = [[] for _ in self.units]
        for index, call in taps.calls:
            deltas = [tf.zeros_like(t) if g is None else g for t, g in zip(call.targets, gradients)]  # a target the loss ignores
            scaled = tuple(tf.cast(d, tf.float32) * per_example_scale for d in deltas)
            by_unit[index].append(Call(call.inputs, call.targets, scaled, taps.values.get(index, ())))
        columns = {}
        for unit, calls in zip(self.units, by_unit):
            norms = unit.rule.squared_norms(unit.layer, calls) if calls else [tf.zeros([taps.batch_size])] * len(unit.columns)
            columns.update(zip(unit.columns, norms))
        return tf.stack([columns[i] for i in range(len(columns))], axis=1)

    @contextlib.contextmanager
    def _installed(self):
        """While any thread is inside, each unit's layer runs its rule's `forward` around its own `call`."""
        with self._lock:
            self._entered += 1
            if self._entered == 1:
                for index, unit in enumerate(self.units):
                    object.__setattr__(unit.layer, "call", _tapped_call(self, index, unit, unit.layer.call))
        try:
            yield
        finally:
            with self._lock:
                self._entered -= 1
                if self._entered == 0:
                    for unit in self.units:
                        del unit.layer.__dict__["call"]

    def _record(self, index: int, call: Call) -> None:
        self._recording[threading.get_ident()].calls.append((index, call))


def _tapped_call(plan: PerExamplePlan, index: int, unit: Unit, call):
    def tapped_call(*args, **kwargs):
        if threading.get_ident() not in plan._recording:  # another thread's untapped call
            return call(*args, **kwargs)
        outputs, record = unit.rule.forward(unit.layer, call, args, kwargs)
        plan._record(index, record)
        return outputs

    return tapped_call


def per_example_plan(model: keras.Model) -> PerExamplePlan:
    """The rules covering `model`'s trainable variables, each exactly once (a ValueError names any that is not)."""
    found = list({id(layer): (layer, rule) for layer, rule in _units(model, top=True)}.values())  # a layer met twice
    order = {id(v): i for i, v in enumerate(model.trainable_variables)}
    units, covered = [], {}
    for layer, rule in found:
        columns = tuple(order.get(id(v), -1) for v in rule.variables(layer))
        for v, column in zip(rule.variables(layer), columns):
            if column < 0:
                raise ValueError(f"per-example norms: variable {v.path} of layer {layer.name} is not a trainable variable of the model")
            if column in covered:
                raise ValueError(f"per-example norms: variable {v.path} is in layers {covered[column]} and {layer.name}")
            covered[column] = layer.name
        units.append(Unit(layer, rule, columns))
    missing = [v.path for i, v in enumerate(model.trainable_variables) if i not in covered]
    if missing:
        raise ValueError(f"per-example norms: no layer's rule covers {', '.join(missing)}")
    return PerExamplePlan(model, units, _coupling(model))


def _coupling(model: keras.Model) -> str | None:
    """Why one example's gradient depends on the others' (a layer that couples them in training), or None."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        for kind, reason in COUPLING.items():
            if isinstance(layer, kind) and layer.trainable:
                return f"{layer.name} ({type(layer).__name__}) {reason}"
    return None


def _same(variables: list, others: list) -> bool:
    return sorted(id(v) for v in variables) == sorted(id(v) for v in others)


def _units(layer, top: bool = False) -> list[tuple[keras.layers.Layer, Rule]]:
    """(layer, rule) pairs covering `layer`'s trainable variables: its own rule, its sublayers', or the fallback."""
    variables = layer.trainable_variables
    if not variables:
        return []
    rule = RULES.get(type(layer))
    if rule is not None and rule.refuses(layer) is None and _same(rule.variables(layer), variables):
        return [(layer, rule)]
    children = list(layer._flatten_layers(include_self=False, recursive=False))
    inside = {id(v) for child in children for v in child.trainable_variables}
    own = [v.path for v in variables if id(v) not in inside]
    if rule is None and not own and not isinstance(layer, OPAQUE):
        return [unit for child in children for unit in _units(child)]
    if top:
        raise ValueError(f"per-example norms: the model's own variables {', '.join(own)} are in no layer")
    return [(layer, FALLBACK)]


def example_columns(labels: tf.Tensor, logits: tf.Tensor, losses: tf.Tensor) -> dict[str, tf.Tensor]:
    """The step's EXAMPLE_COLUMNS (schema.py), each [B], from what it already has: the labels, the logits it
    trained on (before the update) and each example's own loss. O(B·classes): nothing the step did not compute."""
    labels = tf.cast(labels, tf.int32)
    logits = tf.cast(logits, tf.float32)
    predicted = tf.argmax(logits, axis=-1, output_type=tf.int32)
    given = tf.one_hot(labels, tf.shape(logits)[-1], on_value=True, off_value=False)
    label_logit = tf.reduce_sum(tf.where(given, logits, 0.0), axis=-1)
    other = tf.reduce_max(tf.where(given, logits.dtype.min, logits), axis=-1)  # the largest logit of another class
    p_label = tf.reduce_sum(tf.where(given, tf.nn.softmax(logits), 0.0), axis=-1)
    return {
        "label": labels, "predicted": predicted, "loss": losses, "correct": tf.equal(predicted, labels),
        "margin": label_logit - other, "p_label": p_label,
    }  # fmt: skip


def packed(columns: dict[str, tf.Tensor], squared_norms: tf.Tensor) -> tf.Tensor:
    """[B, len(EXAMPLE_COLUMNS) + variables] float32, a row per example: `columns` in EXAMPLE_COLUMNS' order, then
    the squared norms (schema.Examples.from_rows reads it back).

    One tensor out of the step, not one per column: each output of the compiled step is
    another array the k-step loop writes and concatenates every step.
    """
    scalars = [tf.cast(columns[name], tf.float32) for name in EXAMPLE_COLUMNS]  # labels and classes < 2²⁴: exact
    return tf.concat([tf.stack(scalars, axis=1), tf.cast(squared_norms, tf.float32)], axis=1)
