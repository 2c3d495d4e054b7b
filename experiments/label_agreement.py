"""Are the clean examples at the top of the label-issue ranking Fashion-MNIST's own label issues?

Reads the noisy runs benchmarks/label_noise.py trained into `--work` for one condition and
several seeds. The seeds flip different labels and start from different weights, so a clean
example that ranks among the top K (K = the flips) on every seed is one the network disagrees
with whatever the flips: a label of Fashion-MNIST's own that is wrong or ambiguous, or an
example the network cannot learn. For each seed it prints:
- the clean examples in its top K;
- its precision at K once the clean examples that the *other* seeds all rank in their top K
  are left out of the count (they are not chosen by that seed's own ranking), for the
  combined score and for mean loss.

Then it draws the clean examples every seed ranks in its top K, each with its Fashion-MNIST
label and the class the first seed's network predicts, into `--picture`.

    python experiments/label_agreement.py [--work label-noise-work] [--condition uniform-3] [--seeds 0 1 2]
        [--picture agreement.png]

Numbers: docs/performance.md, "The whole training split, 10 epochs".
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from label_flip import FASHION_MNIST_DIR, TRAIN_LABELS

from tapeline.curation.label_issues import label_issues, learning_epochs
from tapeline.data.idx import read_idx_gz
from tapeline.data.registry import FASHION_MNIST
from tapeline.gradients.hardest import render_hardest


def seed_table(work: Path, seed: int, condition: str):
    """(the noisy run's label issues, sorted by sample_id; its flipped sample ids)."""
    directory = work / f"seed-{seed}" / condition
    history = json.loads((directory / "noisy.history.json").read_text())
    issues = label_issues(directory / "storage" / "runs" / "noisy", learning_epochs(history))
    flipped = np.array([int(row["sample_id"]) for row in csv.DictReader((directory / "idx" / "flipped.csv").open())])
    return issues.table.sort_by("sample_id"), flipped


def precision_at_k(suspicion: np.ndarray, truth: np.ndarray) -> float:
    return float(truth[np.argsort(-suspicion, kind="stable")[: truth.sum()]].mean())


def clean_in_top_k(table, flipped: np.ndarray) -> set[int]:
    """The clean examples among the K highest scores, K the flipped ones trained on."""
    ids = table.column("sample_id").to_numpy()
    top = ids[np.argsort(-table.column("score").to_numpy(), kind="stable")[: np.isin(ids, flipped).sum()]]
    return set(top[~np.isin(top, flipped)].tolist())


def precision_without(table, flipped: np.ndarray, left_out: set[int]) -> dict[str, float]:
    """Precision at K of the score and of mean loss, the clean examples in `left_out` not counted."""
    ids = table.column("sample_id").to_numpy()
    truth = np.isin(ids, flipped)
    kept = ~np.isin(ids, list(left_out)) | truth
    return {name: precision_at_k(table.column(name).to_numpy()[kept], truth[kept]) for name in ("score", "mean_loss")}


def draw(tables: dict, seeds: list[int], every: list[int], condition: str) -> bytes:
    """The clean examples in every seed's top K: their Fashion-MNIST label, the first seed's prediction and score."""
    first = tables[seeds[0]][0]
    rows = np.searchsorted(first.column("sample_id").to_numpy(), every)
    images = read_idx_gz(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz", ndim=3)[every]
    labels = read_idx_gz(FASHION_MNIST_DIR / TRAIN_LABELS, ndim=1)[every]
    return render_hardest(
        images, labels, first.column("predicted").to_numpy()[rows], first.column("score").to_numpy()[rows], FASHION_MNIST.classes,
        value_name="score", title=f"{len(every)} clean labels in the top K of seeds {', '.join(map(str, seeds))} ({condition})",
        key=f"each tile: its Fashion-MNIST label / the class seed {seeds[0]} predicts / its score there",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("label-noise-work"))
    parser.add_argument("--condition", default="uniform-3")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--picture", type=Path, default=Path("agreement.png"))
    args = parser.parse_args(argv)
    tables = {seed: seed_table(args.work, seed, args.condition) for seed in args.seeds}
    clean_top = {seed: clean_in_top_k(*tables[seed]) for seed in args.seeds}
    for seed, (table, flipped) in tables.items():
        trained_clean = set(table.column("sample_id").to_pylist()) - set(flipped.tolist())
        agreed = set.intersection(*(clean_top[other] for other in args.seeds if other != seed)) & trained_clean
        cells = precision_without(table, flipped, agreed)
        print(f"seed {seed}: {len(clean_top[seed])} clean examples in the top K; leaving out the {len(agreed)} the other "
              "seeds agree on, precision at K " + ", ".join(f"{name} {value:.3f}" for name, value in cells.items()))  # fmt: skip
    every = sorted(set.intersection(*clean_top.values()))
    print(f"clean examples in the top K of every seed: {len(every)}")
    args.picture.write_bytes(draw(tables, args.seeds, every, args.condition))
    print(f"picture: {args.picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
