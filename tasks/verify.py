"""Recompute a snapshot's gradients from its recorded weights, batch and data, and compare.

    python -m tasks.verify <run dir, run.json or s3://…/runs/<id>> [--step N] [--tolerance 1e-4]

Needs a run trained with `--snapshot-weights`. Exit code 0 when every variable's
relative difference, ||recomputed - stored|| / ||stored||, is within the tolerance.
"""

from __future__ import annotations

import argparse
import sys

import keras
import numpy as np
import tensorflow as tf

from tasks.config import TapelineError
from tasks.model import build_model
from tasks.preprocess import read_split
from tasks.reader import NoGradientsError, gradient_arrays, read_gradients, read_run_json, read_steps


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
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels[rows], logits)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run directory or its run.json")
    parser.add_argument("--step", type=int, help="snapshot step (default: the last one with weights)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted relative difference")
    args = parser.parse_args(argv)
    try:
        report = verify_snapshot(args.run, args.step)
    except (TapelineError, FileNotFoundError) as error:
        print(f"verify: error: {error}", file=sys.stderr)
        return 2
    for name, d in report["variables"].items():
        print(f"{name:24} max |diff| {d['max_abs_difference']:.3e}  relative {d['relative_difference']:.3e}")
    agrees = report["max_relative_difference"] <= args.tolerance
    print(f"step {report['step']}: {'agrees' if agrees else 'DIFFERS'} (largest relative difference "
          f"{report['max_relative_difference']:.3e}, tolerance {args.tolerance:g})")
    return 0 if agrees else 1


if __name__ == "__main__":
    sys.exit(main())
