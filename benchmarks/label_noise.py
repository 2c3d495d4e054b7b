"""Do tapeline's label issues find flipped labels, and does leaving them out help? Fashion-MNIST with synthetic noise.

For each seed and each noise condition:
1. Fashion-MNIST (/usr/share/datasets/fashion-mnist) copied into an IDX directory with
   training labels flipped (experiments/label_flip.py writes it): `uniform-3`, `-10`, `-20`,
   that share of the training file's labels each moved to one of the other nine classes
   uniformly; `shirts`, class-conditional, 20% of each of shirt, T-shirt/top and pullover
   moved to one of the other two. The seed draws the flips and is the run's seed.
2. The noisy arm: `train_model` (the flow's train stage) on it, `--epochs` epochs on the
   first `--train-limit` samples of the training split; its label issues
   (tapeline.curation.label_issues) from the run's samples dataset, over the epochs up to its
   lowest validation loss (`learning_epochs`, as a flow run reads them).
3. Detection, K = the flipped labels among the samples trained on: precision at K, AUROC
   and AUPRC of each signal and of the combined score; the estimated count (flagged) against K.
4. Retrain arms, same seed and epochs, each leaving examples out of the training split
   through the same exclusion as `--exclude` (tapeline/curation/exclusion.py): `curated`
   (the flagged ones), `random` (as many, drawn at random), `oracle` (the true flips).
   Test accuracy of every arm (`evaluate_model` on the untouched test split), and the
   share of the noisy-to-oracle gap that curation recovers.

Results go to `<work>/results.jsonl` (one line per seed and condition); a rerun with the
same `--work` reuses what is there, so the phases can run apart (`--arms noisy` first).

    python benchmarks/label_noise.py [--seeds 0 1 2] [--conditions uniform-3 uniform-10 uniform-20 shirts]
        [--train-limit 20000] [--epochs 10] [--work DIR] [--arms noisy curated random oracle]

Numbers: docs/performance.md, "Label issues: finding flipped labels, and leaving them out".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
from label_flip import FASHION_MNIST_DIR, TRAIN_LABELS, flip_labels, machine, write_relabeled_dataset  # noqa: E402

from tapeline.config import RunConfig  # noqa: E402
from tapeline.curation.exclusion import ids_digest  # noqa: E402
from tapeline.curation.label_issues import label_issues, learning_epochs  # noqa: E402
from tapeline.data.idx import read_idx_gz  # noqa: E402
from tapeline.data.sources import fetch_files  # noqa: E402
from tapeline.data.splits import prepare, read_split  # noqa: E402
from tapeline.storage.root import Storage  # noqa: E402

CONDITIONS = ("uniform-3", "uniform-10", "uniform-20", "shirts")
ARMS = ("noisy", "curated", "random", "oracle")
SHIRTS = (6, 0, 2)  # shirt, T-shirt/top, pullover
SHIRTS_FRACTION = 0.2
MEANINGFUL_GAP = 0.002  # a noisy-to-oracle gap of test accuracy below this is not divided by
# Each signal as a suspicion: higher is more likely mislabeled.
SUSPICION = {"aum": -1, "confidence": -1, "variability": 1, "forgetting": 1, "mean_loss": 1, "mean_grad_norm": 1, "score": 1}


def noisy_labels(condition: str, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(the flipped sample ids, the new labels) of the training file under `condition`."""
    if condition.startswith("uniform-"):
        return flip_labels(labels, int(condition.split("-")[1]) / 100, seed)
    rng = np.random.default_rng(seed)
    among = np.flatnonzero(np.isin(labels, SHIRTS))
    ids = np.sort(rng.choice(among, size=round(SHIRTS_FRACTION * len(among)), replace=False))
    flipped = labels.copy()
    for i in ids:
        flipped[i] = rng.choice([c for c in SHIRTS if c != labels[i]])
    return ids, flipped


def detection(table: pa.Table, flipped: np.ndarray) -> dict:
    """Per signal: precision at K, AUROC, AUPRC; K = the flipped ones among the examples ranked (ties in sample_id order)."""
    table = table.sort_by("sample_id")
    ids = table.column("sample_id").to_numpy()
    truth = np.isin(ids, flipped)
    k = int(truth.sum())
    result = {"k": k, "examples": len(ids), "estimated": int(table.column("flagged").to_numpy(zero_copy_only=False).sum())}
    for name, sign in SUSPICION.items():
        suspicion = sign * table.column(name).to_numpy().astype(np.float64)
        order = np.argsort(-suspicion, kind="stable")
        hits = truth[order]
        precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
        result[name] = {"precision_at_k": float(hits[:k].mean()), "auroc": auroc(suspicion, truth), "auprc": float(precision[hits].mean())}
    return result


def auroc(suspicion: np.ndarray, truth: np.ndarray) -> float:
    """The probability that a flipped example is more suspect than a clean one (ties count half): Mann-Whitney U."""
    ranks = _average_ranks(suspicion)
    positives, negatives = truth.sum(), (~truth).sum()
    return float((ranks[truth].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, ranks) / counts)[inverse]


def exclusion_record(work: Path, name: str, ids: np.ndarray) -> dict:
    """A curation record (run.json's `curation`) that leaves out `ids`, flagged in a label-issues file of its own."""
    path = work / "exclusions" / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"sample_id": pa.array(ids, pa.int64()), "flagged": pa.array(np.ones(len(ids), bool))}), path)
    return {"source_run": name, "label_issues": str(path), "count": len(ids), "digest": ids_digest(ids), "reason": "benchmark arm"}


def run_config(args, source: Path, storage: Storage, seed: int, run_id: str | None = None) -> RunConfig:
    """A run's parameters: the IDX directory, the seed, --epochs and --train-limit; snapshots and checkpoints only at the ends."""
    return RunConfig(
        dataset="idx", source=str(source), storage=str(storage.root), run_name=run_id, epochs=args.epochs, seed=seed,
        train_limit=args.train_limit, snapshot_every=10**6, checkpoint_every=10**6,
    ).validated()  # fmt: skip


def train_arm(args, storage: Storage, source: Path, data, run_id: str, seed: int, curation: dict | None) -> dict:
    """Train one arm (or reuse it, trained before into the same --work) and score its model on the test split."""
    from tapeline.evaluation import evaluate_model
    from tapeline.training.loop import train_model

    run, history = storage.layout.run(run_id), storage.root.parent / f"{run_id}.history.json"
    started = time.perf_counter()
    if not storage.exists(run.model):
        trained = train_model(run_config(args, source, storage, seed, run_id), data, run_id, curation=curation)
        history.write_text(json.dumps(trained.epochs))
    scores = evaluate_model(run.model, data.uris["test"])
    return {
        "test_accuracy": scores["accuracy"], "left_out": curation["count"] if curation else 0, "seconds": round(time.perf_counter() - started, 1),
        "history": json.loads(history.read_text()),
    }  # fmt: skip


def one_condition(args, seed: int, condition: str) -> dict:
    work = args.work / f"seed-{seed}" / condition
    source, storage = work / "idx", Storage(str(work / "storage"))
    labels = read_idx_gz(FASHION_MNIST_DIR / TRAIN_LABELS, ndim=1)
    flipped, relabeled = noisy_labels(condition, labels, seed)
    if not (source / "flipped.csv").exists():
        write_relabeled_dataset(source, labels, flipped, relabeled)
    config = run_config(args, source, storage, seed)
    data = prepare(fetch_files(config.data, storage), storage, seed, config.validation_size)
    trained_ids = read_split(data.uris["train"], args.train_limit)[2]
    result = {"seed": seed, "condition": condition, "train_limit": args.train_limit, "epochs": args.epochs, "arms": {}}
    result["arms"]["noisy"] = train_arm(args, storage, source, data, "noisy", seed, None)
    issues = label_issues(storage.root / "runs" / "noisy", learning_epochs(result["arms"]["noisy"]["history"]))
    result["detection"] = detection(issues.table, flipped)
    result["method"], result["epochs_read"] = issues.method, issues.epochs
    table = issues.table
    flagged = table.filter(table.column("flagged")).column("sample_id").to_numpy()
    truly = np.intersect1d(flipped, trained_ids)
    rng = np.random.default_rng(1000 + seed)
    sets = {"curated": flagged, "random": np.sort(rng.choice(trained_ids, size=len(flagged), replace=False)), "oracle": truly}
    for arm in [a for a in ARMS[1:] if a in args.arms]:
        name = f"{arm}-{ids_digest(sets[arm])}"  # a changed rule gives another set, so another run
        result["arms"][arm] = train_arm(args, storage, source, data, name, seed, exclusion_record(work, name, sets[arm]))
    return result


def summary(results: list[dict]) -> str:
    """The tables of docs/performance.md: detection per condition and signal (mean over seeds), then the arms."""
    lines = []
    for condition in sorted({r["condition"] for r in results}, key=CONDITIONS.index):
        rows = [r for r in results if r["condition"] == condition]
        d = [r["detection"] for r in rows]
        lines.append(f"\n{condition}: {len(rows)} seed(s), K = {', '.join(str(x['k']) for x in d)} of {d[0]['examples']}; "
                     f"estimated {', '.join(str(x['estimated']) for x in d)}")  # fmt: skip
        lines.append("| signal | precision@K | AUROC | AUPRC |")
        lines.append("|---|---|---|---|")
        for name in SUSPICION:
            cells = [_mean_range([x[name][m] for x in d]) for m in ("precision_at_k", "auroc", "auprc")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        arms = [a for a in ARMS if all(a in r["arms"] for r in rows)]
        lines.append("| arm | test accuracy | left out |")
        lines.append("|---|---|---|")
        for arm in arms:
            accuracy, left_out = ([r["arms"][arm][name] for r in rows] for name in ("test_accuracy", "left_out"))
            lines.append(f"| {arm} | {_mean_range(accuracy)} | {_mean_range(left_out, 0)} |")
        if {"noisy", "curated", "oracle"} <= set(arms):
            lines.append(f"gap recovered by curation, (curated - noisy) / (oracle - noisy) of the mean accuracies: {_recovered(rows)}")
    return "\n".join(lines)


def _recovered(rows: list[dict]) -> str:
    mean = {arm: np.mean([r["arms"][arm]["test_accuracy"] for r in rows]) for arm in ("noisy", "curated", "oracle")}
    gap = mean["oracle"] - mean["noisy"]
    return f"{(mean['curated'] - mean['noisy']) / gap:.2f}" if abs(gap) >= MEANINGFUL_GAP else f"none (the gap is {gap:+.3f})"


def _mean_range(values: list[float], digits: int = 3) -> str:
    mean = f"{np.mean(values):.{digits}f}"
    return mean if len(values) == 1 else f"{mean} ({min(values):.{digits}f}–{max(values):.{digits}f})"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="noisy always trains: the others need its label issues")
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N samples of the training split (default: all 55,000)")
    parser.add_argument("--epochs", type=int, default=10, help="enough to memorise the flips (docs/performance.md says why)")
    parser.add_argument("--work", type=Path, default=Path("label-noise-work"), help="where the datasets, runs and results.jsonl go (reused)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (FASHION_MNIST_DIR / TRAIN_LABELS).exists():
        sys.exit(f"label_noise.py: {FASHION_MNIST_DIR} is missing: apt-get install -y dataset-fashion-mnist")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        for condition in args.conditions:
            result = one_condition(args, seed, condition)
            results.append(result)
            with (args.work / "results.jsonl").open("a") as out:
                out.write(json.dumps(result) + "\n")
            print(json.dumps(result), flush=True)
    print(summary(results))
    print(f"machine: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
