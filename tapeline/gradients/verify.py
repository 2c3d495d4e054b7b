"""Recompute a snapshot's gradients from its recorded weights, batch and data, and compare.

    tapeline verify <run dir, run.json or s3://…/runs/<id>> [--step N] [--tolerance 1e-4]

Needs a run trained with `--snapshot-weights`. Exit code 0 when every variable's
relative difference, ||recomputed - stored|| / ||stored||, is within the tolerance.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from tapeline.data.splits import read_split
from tapeline.model import build_model, mean_loss
from tapeline.reader import (
    NoGradientsError,
    gradient_arrays,
    read_gradients,
    read_run_json,
    read_steps,
)


def verify_snapshot(run, step: int | None = None) -> dict:
    manifest = read_run_json(run)
    if step is None:  # the last step that has weights
        table = read_gradients(run, columns=["step", "weights"])
        with_weights = [s for s, w in zip(table.column("step").to_pylist(), table.column("weights").is_valid().to_pylist()) if w]
        if not with_weights:
            raise NoGradientsError(f"{run} recorded no weights: train with --snapshot-weights")
        step = max(with_weights)
    weights, stored = gradient_arrays(run, step, field="weights"), gradient_arrays(run, step)

    batch_ids = np.asarray(read_steps(run, [step], ["sample_ids"]).column("sample_ids")[0].as_py())
    images, labels, sample_ids = read_split(manifest["uris"]["train"])
    rows = np.searchsorted(sample_ids, batch_ids)  # the split is sorted by sample_id

    model = build_model(manifest["parameters"]["precision"])
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

