"""Do per-example gradient norms find mislabeled examples? Precision at K on Fashion-MNIST with flipped labels.

1. Copies Fashion-MNIST (Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist)
   into a new IDX directory, with a seeded `--fraction` of the TRAINING labels flipped,
   each to another class drawn uniformly from the other nine; the test files unchanged,
   `classes.txt` with Fashion-MNIST's names, and `flipped.csv` (sample_id, label, flipped_to).
   A sample's `sample_id` is its index in the training file (tapeline/data/splits.py), so
   the flipped ids are the ids training records; the validation split is held out of the
   same file by the run's seed, and its flipped samples are never trained on.
2. Trains `--epochs` through the flow, as a user would: `python -m tapeline.flows.train
   --dataset idx --source DIR ...` in a subprocess (with no PREFECT_API_URL set, on Prefect's
   temporary local API), into `--storage`.
3. Ranks the training examples with `tapeline.reader.rank_samples(run)` (the last epoch, by
   mean per-example gradient norm), and by mean loss as a baseline.
4. Prints precision at K, K = the number of flipped labels among the samples trained on (the
   ranked ones), against chance (the flipped share of those samples, about `--fraction`),
   with the machine and the wall time.

    python experiments/label_flip.py [--seed 0] [--fraction 0.03] [--epochs 2] [--storage DIR] [--train-limit N]

Numbers: docs/performance.md, "Per-example gradients: finding flipped labels".
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from tapeline.data.idx import encode_idx, read_idx_gz
from tapeline.data.registry import FASHION_MNIST

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
UNCHANGED = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"


def flip_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the flipped sample ids, sorted; the new labels): each flipped label moves to one of the other nine classes."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(len(labels), size=round(fraction * len(labels)), replace=False))
    flipped = labels.copy()
    flipped[ids] = (labels[ids] + rng.integers(1, 10, size=len(ids))) % 10
    return ids, flipped


def write_flipped_dataset(directory: Path, fraction: float, seed: int) -> np.ndarray:
    """Fashion-MNIST with flipped training labels as an IDX directory; the flipped sample ids."""
    labels = read_idx_gz(FASHION_MNIST_DIR / TRAIN_LABELS, ndim=1)
    ids, flipped = flip_labels(labels, fraction, seed)
    write_relabeled_dataset(directory, labels, ids, flipped)
    return ids


def write_relabeled_dataset(directory: Path, labels: np.ndarray, ids: np.ndarray, relabeled: np.ndarray) -> None:
    """Fashion-MNIST as an IDX directory with the training labels `relabeled` (the original `labels` differ at `ids`),
    Fashion-MNIST's `classes.txt`, and `flipped.csv` (sample_id, label, flipped_to)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in UNCHANGED:
        shutil.copyfile(FASHION_MNIST_DIR / name, directory / name)
    (directory / TRAIN_LABELS).write_bytes(gzip.compress(encode_idx(relabeled), mtime=0))
    (directory / "classes.txt").write_text("".join(f"{name}\n" for name in FASHION_MNIST.classes))
    with (directory / "flipped.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["sample_id", "label", "flipped_to"])
        writer.writerows(zip(ids.tolist(), labels[ids].tolist(), relabeled[ids].tolist()))


def train(source: Path, storage: Path, run_name: str, args: argparse.Namespace) -> Path:
    """Train through the flow in a subprocess; the run's directory."""
    command = [
        sys.executable, "-m", "tapeline.flows.train", "--dataset", "idx", "--source", str(source), "--storage", str(storage),
        "--run-name", run_name, "--epochs", str(args.epochs), "--seed", str(args.seed),
    ]  # fmt: skip
    if args.train_limit:
        command += ["--train-limit", str(args.train_limit)]
    environment = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    subprocess.run(command, check=True, env=environment)
    return storage / "runs" / run_name


def precision_at_k(ranked_ids: np.ndarray, flipped: set[int], k: int) -> float:
    return len(flipped.intersection(ranked_ids[:k].tolist())) / k if k else float("nan")


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor())
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed of the flips and of the run (validation split, order, weights)")
    parser.add_argument("--fraction", type=float, default=0.03, help="share of the training labels to flip")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs; the ranking is over the last")
    parser.add_argument("--storage", type=Path, default=None, help="storage root of the run (default: a new temporary directory)")
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N samples of the training split")
    args = parser.parse_args(argv)
    if not 0 < args.fraction < 1:
        parser.error(f"--fraction must be between 0 and 1, got {args.fraction}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (FASHION_MNIST_DIR / TRAIN_LABELS).exists():
        sys.exit(f"label_flip.py: {FASHION_MNIST_DIR} is missing: apt-get install -y dataset-fashion-mnist")
    from tapeline.reader import rank_samples, read_run_json

    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="tapeline-label-flip-"))
    source, storage = work / "idx", (args.storage or work / "storage").resolve()
    flipped_ids = write_flipped_dataset(source, args.fraction, args.seed)
    run = train(source, storage, f"label-flip-{args.seed}-{uuid.uuid4().hex[:8]}", args)

    ranking = rank_samples(run)  # the last epoch, highest mean per-example gradient norm first
    ranked_ids = ranking.column("sample_id").to_numpy()
    by_loss = ranked_ids[np.argsort(-ranking.column("mean_loss").to_numpy(), kind="stable")]
    flipped = set(flipped_ids.tolist()).intersection(ranked_ids.tolist())  # the flipped samples trained on
    k = len(flipped)
    manifest = read_run_json(run)
    print(f"flipped {len(flipped_ids)} of the training file's labels ({args.fraction:g}, seed {args.seed}) in {source}")
    print(f"run {run}: {manifest['parameters']['epochs']} epochs, {len(ranked_ids)} training samples, "
          f"test accuracy {manifest['metrics']['test_accuracy']:.4f}")  # fmt: skip
    print(f"K = {k} flipped labels among the samples trained on; chance {k / len(ranked_ids):.4f}")
    print(f"precision at K, by mean per-example gradient norm (last epoch): {precision_at_k(ranked_ids, flipped, k):.4f}")
    print(f"precision at K, by mean loss (last epoch), for comparison:      {precision_at_k(by_loss, flipped, k):.4f}")
    print(f"machine: {machine()}; device {manifest['device']}")
    print(f"wall time {time.perf_counter() - started:.0f} s (train stage {manifest['stages']['train']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
