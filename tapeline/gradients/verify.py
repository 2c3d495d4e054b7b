"""Recompute a snapshot's gradients from its recorded weights, batch and data, and compare.

    tapeline verify <run id, run dir, run.json or s3://…/runs/<id>> [--storage ROOT] [--step N] [--tolerance 1e-4]

Needs a run trained with `--snapshot-weights`. Exit code 0 when every variable's
relative difference, ||recomputed - stored|| / ||stored||, is within the tolerance.
Which snapshot to verify is read without TensorFlow (`snapshot_step`): a step that is
not there is answered before TensorFlow loads.
"""

from __future__ import annotations

import numpy as np

from tapeline.data.splits import read_split
from tapeline.reader import (
    NoGradientsError,
    NotInRunError,
    gradient_arrays,
    read_gradients,
    read_run_json,
    read_steps,
    spans,
)
from tapeline.storage.layout import locate_run


def verify_snapshot(run, step: int | None = None) -> dict:
    """Recompute the gradients of snapshot `step` (default: the last one with weights) and compare them with the stored."""
    return compare_snapshot(run, snapshot_step(run, step))


def snapshot_step(run, step: int | None = None) -> int:
    """`step`, or the last snapshot step with weights; NotInRunError when `step` has no snapshot with weights."""
    table = read_gradients(run, columns=["step", "weights"])
    with_weights = sorted({s for s, w in zip(table.column("step").to_pylist(), table.column("weights").is_valid().to_pylist()) if w})
    if not with_weights:
        raise NoGradientsError(f"{run} recorded no weights: train with --snapshot-weights")
    if step is not None and step not in with_weights:
        raise NotInRunError(f"run {locate_run(run)[1].run_id} has no snapshot with weights at step {step}; the steps that have one: {spans(with_weights)}")
    return with_weights[-1] if step is None else step


def compare_snapshot(run, step: int) -> dict:
    """Recompute the gradients of snapshot `step`, one with weights, and compare them with the stored."""
    import tensorflow as tf  # seconds of imports: only once the snapshot is known to be there

    from tapeline.model import mean_loss

    manifest = read_run_json(run)
    weights, stored = gradient_arrays(run, step, field="weights"), gradient_arrays(run, step)

    batch_ids = np.asarray(read_steps(run, [step], ["sample_ids"]).column("sample_ids")[0].as_py())
    images, labels, sample_ids = read_split(manifest["uris"]["train"])
    rows = np.searchsorted(sample_ids, batch_ids)  # the split is sorted by sample_id

    model = rebuilt_model(manifest)
    for variable in model.trainable_variables:
        variable.assign(weights[variable.path])
    with tf.GradientTape() as tape:
        logits = model(images[rows], training=True)
        loss = mean_loss(labels[rows], logits)
    recomputed = dict(zip((v.path for v in model.trainable_variables), tape.gradient(loss, model.trainable_variables)))

    differences = {}
    for name, value in stored.items():
        delta = recomputed[name].numpy() - value
        differences[name] = {
            "max_abs_difference": float(np.abs(delta).max()),
            "relative_difference": float(np.linalg.norm(delta) / max(np.linalg.norm(value), 1e-30)),
        }
    return {
        "step": step,
        "max_relative_difference": max(d["relative_difference"] for d in differences.values()),
        "variables": differences,
    }


def rebuilt_model(manifest: dict):
    """A new model of the run's spec, for its data's shape, under its precision: the one it trained, before training."""
    from tapeline.config import DEFAULT_MODEL
    from tapeline.data.shape import DataShape
    from tapeline.model import ModelSpec

    dataset, parameters = manifest["dataset"], manifest["parameters"]
    shape = DataShape(dataset.get("image_shape", (28, 28, 1)), dataset["classes"])  # a run.json without it: 28x28 grey
    return ModelSpec(parameters.get("model", DEFAULT_MODEL)).build(shape, parameters["precision"])
