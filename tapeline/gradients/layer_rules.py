"""The exact rules for each example's squared gradient norm per variable, one registry entry per layer type.

A rule gets, for every call of its layer in the step's forward pass, what it recorded
during the call (`Call.inputs`) and the gradients of each example's own loss at the
tensors it tapped (`Call.deltas`, float32, already scaled to each example's loss), and
returns [B] per variable of the layer. The math, one line per rule, is in
docs/design.md ("Per-example gradient norms without per-example gradients").

Adding a rule: a `Rule` in `RULES` keyed by the layer's exact type, and a test in
tests/test_layer_rules.py. A type without a rule (or whose rule refuses a layer) takes
`FALLBACK`: the layer's own call, differentiated per example.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import keras
import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # whether the step is being compiled by XLA


@dataclass
class Call:
    """One call of a tapped layer: what its rule needs (`inputs`), the tensors whose gradients it needs
    (`targets`), and, once the tape has given them, those gradients (`deltas`, float32, per example's loss)."""

    inputs: tuple
    targets: tuple
    deltas: tuple = ()
    values: tuple = ()  # for a rule that `reads_variables`: their values as the forward pass read them


@dataclass(frozen=True)
class Rule:
    """How one layer type's per-example squared norms are computed.

    variables(layer): the variables it covers, in the order `squared_norms` returns them.
    forward(layer, call, args, kwargs) -> (outputs, Call): runs the layer's own `call` (the
        computation stays the layer's) and says what it recorded.
    squared_norms(layer, calls) -> [B] per variable, over all of the layer's calls in the step.
    refuses(layer) -> a reason this layer takes the fallback instead, or None.
    reads_variables: its norms need the variables' values, read before the step updates them (`Call.values`).
    """

    variables: Callable[[keras.layers.Layer], list]
    forward: Callable[..., tuple]
    squared_norms: Callable[[keras.layers.Layer, list[Call]], list[tf.Tensor]]
    refuses: Callable[[keras.layers.Layer], str | None] = lambda layer: None
    reads_variables: bool = False


# --- shared pieces -----------------------------------------------------------------------------------------------


def _first_input(args: tuple, kwargs: dict):
    return args[0] if args else kwargs["inputs"]


def _pre_activation(layer, call, args, kwargs) -> tuple:
    """The layer's own call with its activation set aside: taps the pre-activation output z, returns activation(z)."""
    activation = layer.activation
    if activation in (None, keras.activations.linear):
        z = call(*args, **kwargs)
        return z, Call(inputs=(_first_input(args, kwargs),), targets=(z,))
    object.__setattr__(layer, "activation", keras.activations.linear)
    try:
        z = call(*args, **kwargs)
    finally:
        object.__setattr__(layer, "activation", activation)
    return activation(z), Call(inputs=(_first_input(args, kwargs),), targets=(z,))


def _f32(t) -> tf.Tensor:
    return tf.cast(t, tf.float32)


def _positions(t: tf.Tensor) -> tf.Tensor:
    """[B, positions, features]: every axis between the batch and the last one flattened."""
    positions = 1
    for n in t.shape[1:-1]:
        positions = positions * n if n is not None and positions is not None else None
    return tf.reshape(_f32(t), [tf.shape(t)[0], -1 if positions is None else positions, t.shape[-1]])


def outer_squared_norms(a: tf.Tensor, d: tf.Tensor) -> tf.Tensor:
    """[B]: ‖Σₜ aₜᵀδₜ‖² for a [B, T, n], d [B, T, m], by the cheaper exact form for the static shapes.

    T = 1: ‖a‖²‖δ‖². T² < n·m: the Gram form Σₜ,ₛ (aₜ·aₛ)(δₜ·δₛ). Otherwise the example's gradient aᵀδ itself.
    """
    positions, n, m = a.shape[1], a.shape[2], d.shape[2]
    if positions == 1:
        return tf.reduce_sum(tf.square(a), axis=[1, 2]) * tf.reduce_sum(tf.square(d), axis=[1, 2])
    if positions is not None and positions * positions < n * m:
        return tf.reduce_sum(tf.matmul(a, a, transpose_b=True) * tf.matmul(d, d, transpose_b=True), axis=[1, 2])
    return tf.reduce_sum(tf.square(tf.matmul(a, d, transpose_a=True)), axis=[1, 2])


def _bias_squared_norms(deltas: list[tf.Tensor]) -> tf.Tensor:
    """[B]: ‖Σ over every call's positions of δ‖², for deltas [B, ..., m]."""
    return tf.reduce_sum(tf.square(sum(tf.reduce_sum(_positions(d), axis=1) for d in deltas)), axis=-1)


def _concatenated(tensors: list[tf.Tensor]) -> tf.Tensor:
    """Several calls' [B, T_k, n] as one longer sequence of positions per example: a shared layer's gradient sums them."""
    return tensors[0] if len(tensors) == 1 else tf.concat(tensors, axis=1)


def _linear_variables(layer) -> list:
    return [layer.kernel] + ([layer.bias] if layer.bias is not None else [])


# --- Dense ---------------------------------------------------------------------------------------------------------


def _dense_norms(layer, calls: list[Call]) -> list[tf.Tensor]:
    a = _concatenated([_positions(c.inputs[0]) for c in calls])
    d = _concatenated([_positions(c.deltas[0]) for c in calls])
    return [outer_squared_norms(a, d)] + ([_bias_squared_norms([c.deltas[0] for c in calls])] if layer.bias is not None else [])


# --- convolutions (channels last) --------------------------------------------------------------------------------


def _channels_last(layer) -> str | None:
    return None if layer.data_format == "channels_last" else "channels_first"


def _patches(a: tf.Tensor, out_size: tuple, kernel: tuple, strides: tuple, dilation: tuple, padding: str) -> tf.Tensor:
    """[B, positions, kh·kw, channels]: each output position's input patch, one strided slice per kernel offset.

    For a [B, H, W, C] (1-D convolutions come as H = 1). Slices and one concatenation, not
    `tf.image.extract_patches`: on this CPU under XLA the product that follows runs twice as fast on this
    layout (docs/performance.md).
    """
    if padding == "causal":  # as Conv1D pads: all on the left
        a = tf.pad(a, [[0, 0], [0, 0], [(kernel[1] - 1) * dilation[1], 0], [0, 0]])
    elif padding == "same":  # as TensorFlow pads: the odd pixel after
        total = [max((n - 1) * s + (k - 1) * r + 1 - size, 0) for n, s, k, r, size in zip(out_size, strides, kernel, dilation, a.shape[1:3])]
        a = tf.pad(a, [[0, 0], *([t // 2, t - t // 2] for t in total), [0, 0]])
    (height, width), (kh, kw), (sh, sw), (dh, dw) = out_size, kernel, strides, dilation
    views = [
        a[:, i * dh : i * dh + (height - 1) * sh + 1 : sh, j * dw : j * dw + (width - 1) * sw + 1 : sw, :]
        for i in range(kh) for j in range(kw)
    ]  # fmt: skip
    return tf.reshape(tf.concat(views, axis=-1), [tf.shape(a)[0], height * width, kh * kw, a.shape[-1]])


def _as_2d(layer, a: tf.Tensor, d: tf.Tensor) -> tuple:
    """(a, d, kernel size, strides, dilation) with 1-D convolutions as 2-D ones of height 1."""
    if layer.rank == 2:
        return _f32(a), _f32(d), layer.kernel_size, layer.strides, layer.dilation_rate
    return _f32(a)[:, None], _f32(d)[:, None], (1, *layer.kernel_size), (1, *layer.strides), (1, *layer.dilation_rate)


def _conv_positions(layer, call_inputs: tf.Tensor, delta: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(patches [B, P, kh·kw, C], δ [B, P, filters]) of one call of a convolution."""
    a, d, kernel, strides, dilation = _as_2d(layer, call_inputs, delta)
    patches = _patches(a, (d.shape[1], d.shape[2]), kernel, strides, dilation, layer.padding)
    return patches, tf.reshape(d, [tf.shape(d)[0], -1, d.shape[-1]])


def grouped_squared_norms(patches: tf.Tensor, d: tf.Tensor, groups: int) -> tf.Tensor:
    """[B]: ‖the example's kernel gradient‖², each group's Pᵀδ over its own channels and filters.

    patches [B, P, kh·kw, C], d [B, P, F]; group g sees channels g·C/G… and makes filters g·F/G….
    """
    batch, positions, offsets, channels = tf.shape(patches)[0], patches.shape[1], patches.shape[2], patches.shape[3]
    if groups == 1:
        return outer_squared_norms(tf.reshape(patches, [batch, positions, offsets * channels]), d)
    patches = tf.reshape(patches, [batch, positions, offsets, groups, channels // groups])
    patches = tf.reshape(tf.transpose(patches, [0, 3, 1, 2, 4]), [batch * groups, positions, offsets * channels // groups])
    per_group = d.shape[-1] // groups
    d = tf.reshape(tf.transpose(tf.reshape(d, [batch, positions, groups, per_group]), [0, 2, 1, 3]), [batch * groups, positions, per_group])
    return tf.reduce_sum(tf.reshape(outer_squared_norms(patches, d), [batch, groups]), axis=1)


def _conv_kernel_norms(layer, calls: list[Call], groups: int, delta_index: int = 0) -> tf.Tensor:
    positions = [_conv_positions(layer, c.inputs[0], c.deltas[delta_index]) for c in calls]
    return grouped_squared_norms(_concatenated([p for p, _ in positions]), _concatenated([d for _, d in positions]), groups)


def _conv_norms(layer, calls: list[Call]) -> list[tf.Tensor]:
    kernel = _conv_kernel_norms(layer, calls, layer.groups)
    return [kernel] + ([_bias_squared_norms([c.deltas[0] for c in calls])] if layer.bias is not None else [])


def _depthwise_norms(layer, calls: list[Call]) -> list[tf.Tensor]:
    """A depthwise convolution is a grouped one with a group per input channel."""
    kernel = _conv_kernel_norms(layer, calls, calls[0].inputs[0].shape[-1])
    return [kernel] + ([_bias_squared_norms([c.deltas[0] for c in calls])] if layer.bias is not None else [])


def _separable_forward(layer, call, args, kwargs) -> tuple:
    """The separable convolution as the layer computes it (tf.nn.separable_conv2d): the depthwise convolution with
    the layer's strides, padding and dilation, then the 1 × 1 pointwise one; tapping both outputs."""
    inputs = _first_input(args, kwargs)
    h = keras.ops.depthwise_conv(inputs, layer.depthwise_kernel, layer.strides, layer.padding, layer.data_format, layer.dilation_rate)
    z = keras.ops.conv(h, layer.pointwise_kernel, strides=1, padding="valid", data_format=layer.data_format)
    if layer.bias is not None:
        z = keras.ops.add(z, layer.bias)
    return (z if layer.activation is None else layer.activation(z)), Call(inputs=(inputs, h), targets=(h, z))


def _separable_norms(layer, calls: list[Call]) -> list[tf.Tensor]:
    depthwise = _conv_kernel_norms(layer, calls, calls[0].inputs[0].shape[-1], delta_index=0)
    pointwise = outer_squared_norms(_concatenated([_positions(c.inputs[1]) for c in calls]), _concatenated([_positions(c.deltas[1]) for c in calls]))
    return [depthwise, pointwise] + ([_bias_squared_norms([c.deltas[1] for c in calls])] if layer.bias is not None else [])


# --- Embedding, LayerNormalization, EinsumDense --------------------------------------------------------------------


def _output_forward(layer, call, args, kwargs) -> tuple:
    """The layer's own call, tapping its output."""
    outputs = call(*args, **kwargs)
    return outputs, Call(inputs=(_first_input(args, kwargs),), targets=(outputs,))


def _embedding_norms(layer, calls: list[Call]) -> list[tf.Tensor]:
    """‖Σₜ e_{idₜ} δₜᵀ‖² = Σₜ,ₛ [idₜ = idₛ] δₜ·δₛ: positions looking up the same row add up."""
    ids = _concatenated([tf.reshape(tf.cast(c.inputs[0], tf.int32), [tf.shape(c.inputs[0])[0], -1]) for c in calls])
    d = _concatenated([tf.reshape(_f32(c.deltas[0]), [tf.shape(c.deltas[0])[0], -1, c.deltas[0].shape[-1]]) for c in calls])
    same = tf.cast(tf.equal(ids[:, :, None], ids[:, None, :]), tf.float32)
    return [tf.reduce_sum(same * tf.matmul(d, d, transpose_b=True), axis=[1, 2])]


def _layer_norm_variables(layer) -> list:
    return [v for v in (layer.gamma, layer.beta) if v is not None]


def _layer_norm_norms(layer, calls: list[Call]) -> list[tf.Tensor]:
    """γ: ‖Σₜ x̂ₜ ⊙ δₜ‖², β: ‖Σₜ δₜ‖², with x̂ the input normalised over the layer's axes with its epsilon."""
    gamma, beta = 0.0, 0.0
    for c in calls:
        x, d = _f32(c.inputs[0]), _f32(c.deltas[0])
        axes = [axis % x.shape.rank for axis in layer.axis]
        others = [axis for axis in range(1, x.shape.rank) if axis not in axes]
        mean, variance = tf.nn.moments(x, axes, keepdims=True)
        normalized = (x if layer.rms_scaling else x - mean) * tf.math.rsqrt(variance + layer.epsilon)
        gamma += tf.reduce_sum(normalized * d, axis=others)
        beta += tf.reduce_sum(d, axis=others)
    squared = lambda g: tf.reduce_sum(tf.square(tf.reshape(g, [tf.shape(g)[0], -1])), axis=1)  # noqa: E731
    return [squared(g) for g, v in ((gamma, layer.gamma), (beta, layer.beta)) if v is not None]


def _einsum_parts(layer) -> tuple[str, str, str]:
    inputs, rest = layer.equation.split(",")
    kernel, outputs = rest.split("->")
    return inputs, kernel, outputs


def _einsum_refuses(layer) -> str | None:
    inputs, kernel, outputs = _einsum_parts(layer)
    batch = inputs[:1]
    if "." in layer.equation or batch not in outputs or batch in kernel or batch in (layer.bias_axes or ""):
        return f"equation {layer.equation} has no plain batch axis"
    if any(letter not in inputs + outputs for letter in kernel):
        return f"equation {layer.equation} sums a kernel axis out"
    return None


def _einsum_norms(layer, calls: list[Call]) -> list[tf.Tensor]:
    """The example's kernel gradient: einsum(input, δ -> batch + kernel axes); the bias's: δ summed to its axes."""
    inputs, kernel, outputs = _einsum_parts(layer)
    batch = inputs[0]
    gradient = sum(tf.einsum(f"{inputs},{outputs}->{batch}{kernel}", _f32(c.inputs[0]), c.deltas[0]) for c in calls)
    norms = [tf.reduce_sum(tf.square(tf.reshape(gradient, [tf.shape(gradient)[0], -1])), axis=1)]
    if layer.bias is not None:
        bias = sum(tf.einsum(f"{outputs}->{batch}{layer.bias_axes}", c.deltas[0]) for c in calls)
        norms.append(tf.reduce_sum(tf.square(tf.reshape(bias, [tf.shape(bias)[0], -1])), axis=1))
    return norms


# --- the general fallback -------------------------------------------------------------------------------------------


def _fallback_forward(layer, call, args, kwargs) -> tuple:
    outputs = call(*args, **kwargs)
    targets = tuple(t for t in tf.nest.flatten(outputs) if tf.is_tensor(t) and t.dtype.is_floating)
    return outputs, Call(inputs=(args, kwargs), targets=targets)


def _fallback_norms(layer, calls: list[Call]) -> list[tf.Tensor]:
    """Per example, the VJP of the layer's own call with respect to its variables, given (aᵢ, δᵢ); summed over
    the layer's calls. Exact when the layer treats examples independently (every tensor argument batch-major).

    The call runs on the variables' values as the forward pass read them (`Call.values`, in a
    `keras.StatelessScope`), so the step may update the variables before this runs.
    """
    variables, values = layer.trainable_variables, list(calls[0].values)
    structures = [c.inputs for c in calls]
    tensors = [[t for t in tf.nest.flatten(s) if tf.is_tensor(t)] for s in structures]

    def example(slices):
        with tf.GradientTape() as tape, keras.StatelessScope(state_mapping=list(zip(variables, values))):
            tape.watch(values)
            total = 0.0
            for structure, (inputs, deltas) in zip(structures, slices):
                rows = iter([t[None] for t in inputs])
                args, kwargs = tf.nest.pack_sequence_as(structure, [next(rows) if tf.is_tensor(t) else t for t in tf.nest.flatten(structure)])
                outputs = [t for t in tf.nest.flatten(layer(*args, **kwargs)) if tf.is_tensor(t) and t.dtype.is_floating]
                total += sum(tf.reduce_sum(_f32(o) * d[None]) for o, d in zip(outputs, deltas))
        gradients = tape.gradient(total, values, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        return tf.stack([tf.reduce_sum(tf.square(_f32(tf.convert_to_tensor(g)))) for g in gradients])

    elems = [(inputs, list(c.deltas)) for inputs, c in zip(tensors, calls)]
    return tf.unstack(_per_example_map(example, elems, len(variables)), num=len(variables), axis=1)


def _per_example_map(fn, elems, width: int) -> tf.Tensor:
    """[B, width]: `fn` on each example of `elems`, vectorised (`tf.vectorized_map`) where XLA can compile that.

    Vectorising a loop (an RNN's) yields a graph XLA does not compile (an `If` on variants in a while
    loop): under XLA, a function with control flow maps one example at a time (`tf.map_fn`) instead.
    """
    if control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()) and _has_control_flow(fn, elems):
        return tf.map_fn(fn, elems, fn_output_signature=tf.TensorSpec([width], tf.float32))
    return tf.vectorized_map(fn, elems)


def _has_control_flow(fn, elems) -> bool:
    """Whether `fn` on one example traces a loop or a conditional (traced apart, in a graph of its own)."""
    spec = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape[1:], t.dtype), elems)
    graph = tf.function(fn).get_concrete_function(spec).graph
    return any(op.type in ("While", "StatelessWhile", "If", "StatelessIf") for op in graph.get_operations())


FALLBACK = Rule(lambda layer: list(layer.trainable_variables), _fallback_forward, _fallback_norms, reads_variables=True)

# Exact types: a subclass may compute something else in its `call`, so it takes the fallback.
RULES: dict[type, Rule] = {
    keras.layers.Dense: Rule(_linear_variables, _pre_activation, _dense_norms),
    keras.layers.Conv1D: Rule(_linear_variables, _pre_activation, _conv_norms, _channels_last),
    keras.layers.Conv2D: Rule(_linear_variables, _pre_activation, _conv_norms, _channels_last),
    keras.layers.DepthwiseConv2D: Rule(_linear_variables, _pre_activation, _depthwise_norms, _channels_last),
    keras.layers.SeparableConv2D: Rule(
        lambda layer: [layer.depthwise_kernel, layer.pointwise_kernel] + ([layer.bias] if layer.bias is not None else []),
        _separable_forward,
        _separable_norms,
        _channels_last,
    ),
    keras.layers.Embedding: Rule(lambda layer: [layer.embeddings], _output_forward, _embedding_norms),
    keras.layers.LayerNormalization: Rule(_layer_norm_variables, _output_forward, _layer_norm_norms),
    keras.layers.EinsumDense: Rule(_linear_variables, _pre_activation, _einsum_norms, _einsum_refuses),
}

# Layers whose output for one example depends on the others' in training: per-example gradients are not defined.
COUPLING: dict[type, str] = {
    keras.layers.BatchNormalization: "normalises each example by its batch's statistics, so an example's gradient depends on the others",
}

# Layers that call their sublayers on something other than the batch's examples (steps, rows): never looked into.
OPAQUE = (keras.layers.RNN, keras.layers.TimeDistributed)
