"""Label issues from a run's training dynamics, and curated runs that leave the flagged examples out (--exclude).

Real runs through train-flow on a real Prefect API, on a tiny learnable IDX dataset with
some of its training labels flipped.
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterName

from tapeline.cli import main
from tapeline.curation.exclusion import ids_digest
from tapeline.curation.label_issues import combined_score, learning_epochs, wrong_posterior
from tapeline.flows.train import train_flow
from tapeline.reader import read_samples, read_steps
from tapeline.registry.champion import ChampionPointer
from tapeline.registry.retention import lineage
from tapeline.storage.root import Storage
from tests.helpers import tiny_arrays, write_own_dir

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
RUN = {"epochs": 3, "batch_size": 16, "validation_size": 50, "steps_per_call": 4, "snapshot_every": 1000}
FLIPPED = 20

pytestmark = pytest.mark.usefixtures("prefect_api")


def flipped_arrays(seed: int) -> tuple[dict, np.ndarray]:
    """The tiny dataset with FLIPPED training labels moved to another class; the flipped sample ids."""
    arrays = tiny_arrays(n_train=400, seed=seed)
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(400, FLIPPED, replace=False))
    arrays["train_labels"][ids] = (arrays["train_labels"][ids] + rng.integers(1, 10, FLIPPED)) % 10
    return arrays, ids


def train(store: Path, name: str, source: Path, **parameters) -> dict:
    return train_flow(dataset="idx", source=str(source), storage=str(store), run_name=name, **(RUN | parameters))


@pytest.fixture(scope="module")
def noisy(tmp_path_factory) -> tuple[Path, dict, np.ndarray]:
    root = tmp_path_factory.mktemp("label-issues")
    arrays, flipped = flipped_arrays(seed=0)
    write_own_dir(root / "data", arrays, classes=CLASSES)
    return root, train(root / "store", "noisy", root / "data"), flipped


def issues_table(manifest: dict):
    return pq.read_table(manifest["uris"]["label_issues"])


def trained_ids(manifest: dict) -> set[int]:
    return {i for ids in read_steps(run_dir(manifest), columns=["sample_ids"]).column("sample_ids").to_pylist() for i in ids}


def run_dir(manifest: dict) -> str:
    return str(Path(manifest["uris"]["model"]).parent)


def test_each_row_is_the_examples_training_dynamics_recomputed_from_its_samples(noisy):
    _, manifest, _ = noisy
    table = issues_table(manifest)
    read = manifest["label_issues"]["epochs"]  # up to the lowest validation loss
    assert read == learning_epochs(manifest["metrics"]["epochs"]) and read[0] == 1
    by_example = defaultdict(list)
    for row in sorted(read_samples(run_dir(manifest)).to_pylist(), key=lambda row: row["step"]):
        if row["epoch"] in read:
            by_example[row["sample_id"]].append(row)
    assert table.num_rows == len(by_example) == manifest["dataset"]["train_samples"]
    for got in table.to_pylist():
        rows = by_example[got["sample_id"]]
        epochs = sorted({row["epoch"] for row in rows})
        per_epoch = [statistics.fmean(row["p_label"] for row in rows if row["epoch"] == epoch) for epoch in epochs]
        correct = [row["correct"] for row in rows]
        expected = {
            "label": rows[-1]["label"],
            "predicted": rows[-1]["predicted"],
            "seen": len(rows),
            "forgetting": sum(a and not b for a, b in zip(correct, correct[1:])),
            "aum": statistics.fmean(row["margin"] for row in rows),
            "confidence": statistics.fmean(per_epoch),
            "variability": statistics.pstdev(per_epoch),
            "mean_loss": statistics.fmean(row["loss"] for row in rows),
            "mean_grad_norm": statistics.fmean(row["grad_norm"] for row in rows),
        }
        assert {name: got[name] for name in expected} == pytest.approx(expected, rel=1e-5, abs=1e-6), got["sample_id"]
    # Rank order, and the flagged ones are the top `estimated` of it.
    assert table.column("rank").to_pylist() == list(range(1, table.num_rows + 1))
    assert np.all(np.diff(table.column("score").to_numpy()) <= 0)
    estimated = manifest["label_issues"]["estimated"]
    assert table.column("flagged").to_pylist() == [rank <= estimated for rank in range(1, table.num_rows + 1)]
    assert manifest["label_issues"]["examples"] == table.num_rows and "mixture" in manifest["label_issues"]["method"]


def test_the_signals_are_read_up_to_the_lowest_validation_loss():
    """Memorising the wrong labels begins where the validation loss turns up: the epochs after its (first) lowest are
    left out; every epoch is read without a validation split."""
    history = [{"epoch": epoch, "val_loss": loss} for epoch, loss in enumerate([0.49, 0.47, 0.47, 0.49, 0.51, 0.46, 0.6], start=1)]
    assert learning_epochs(history) == [1, 2, 3, 4, 5, 6]
    assert learning_epochs(history[:5]) == [1, 2]
    assert learning_epochs([{"epoch": epoch, "val_loss": None} for epoch in (1, 2, 3)]) == [1, 2, 3]
    assert learning_epochs([]) == []


def test_a_doubt_in_a_pair_the_network_often_confuses_ranks_below_the_same_doubt_in_a_pair_it_never_does():
    """Two examples with the same loss and margin: one given shirt and predicted T-shirt, among many clean shirts the
    network half takes for T-shirts; one given sneaker and predicted trouser, where only wrong labels sit. The second is
    the likelier wrong label, and its score is higher."""
    t_shirt, trouser, shirt, sneaker, bag = 0, 1, 6, 7, 8
    easy, confused, wrong = 300, 60, 20
    label = np.r_[np.full(easy, bag), np.full(confused + 1, shirt), np.full(wrong + 1, sneaker)]
    predicted = np.r_[np.full(easy, bag), np.full(confused + 1, t_shirt), np.full(wrong + 1, trouser)]
    confidence = np.r_[np.full(easy, 0.97), np.full(confused, 0.4), 0.1, np.full(wrong, 0.02), 0.1]
    dynamics = {"label": label, "predicted": predicted, "confidence": confidence, "aum": np.log(confidence), "mean_loss": -np.log(confidence)}
    score = combined_score(dynamics, wrong_posterior(dynamics))
    doubted_shirt, doubted_sneaker = easy + confused, len(label) - 1
    assert score[doubted_sneaker] > score[doubted_shirt]


def test_the_flipped_labels_rank_first_and_their_count_is_estimated(noisy):
    _, manifest, flipped = noisy
    table = issues_table(manifest)
    truly = set(flipped.tolist()) & trained_ids(manifest)  # the flipped ones not held out for validation
    k = len(truly)
    top = set(table.column("sample_id").to_pylist()[:k])
    assert len(top & truly) / k >= 0.8
    assert 0.75 * k <= manifest["label_issues"]["estimated"] <= 1.25 * k


def test_the_command_lists_the_suspects_with_class_names(noisy, capsys):
    root, manifest, _ = noisy
    table = issues_table(manifest).to_pylist()
    assert main(["label-issues", "noisy", "--storage", str(root / "store"), "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{manifest['label_issues']['estimated']} of {len(table)} training labels estimated wrong ({manifest['label_issues']['method']})"
    assert [line.split()[:4] for line in lines[2:]] == [[str(r["rank"]), str(r["sample_id"]), CLASSES[r["label"]], CLASSES[r["predicted"]]] for r in table[:3]]

    label = table[0]["label"]
    assert main(["label-issues", str(Path(run_dir(manifest)) / "run.json"), "--label", str(label), "--top", "100"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == sum(r["label"] == label for r in table) and {row.split()[2] for row in rows} == {CLASSES[label]}

    assert main(["label-issues", "noisy", "--storage", str(root / "store"), "--label", "12"]) == 2
    assert capsys.readouterr().err.splitlines() == ["tapeline label-issues: error: run noisy has no training example of label 12; its labels are 0–9"]


def test_the_flow_run_shows_the_suspects_and_the_estimate(noisy):
    _, manifest, _ = noisy
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["noisy"])))
        artifacts = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))}
    markdown = artifacts["label-issues"].data
    summary = manifest["label_issues"]
    assert f"**{summary['estimated']:,} of {summary['examples']:,} training labels" in markdown
    assert "data:image/png;base64," in markdown and Path(run_dir(manifest), "label_issues.png").stat().st_size > 0
    first = issues_table(manifest).to_pylist()[0]
    assert f"| 1 | {first['sample_id']} | {CLASSES[first['label']]} | {CLASSES[first['predicted']]} |" in markdown
    assert "left out: **0**" in artifacts["curation"].data


def test_a_curated_run_never_trains_on_the_flagged_examples(noisy):
    root, source, _ = noisy
    curated = train(root / "store", "curated", root / "data", exclude="noisy")
    flagged = {r["sample_id"] for r in issues_table(source).to_pylist() if r["flagged"]}
    assert flagged and curated["curation"] == {
        "source_run": "noisy", "label_issues": source["uris"]["label_issues"], "count": len(flagged),
        "digest": ids_digest(np.array(sorted(flagged))), "reason": "named run",
    }  # fmt: skip
    seen = trained_ids(curated)
    assert not seen & flagged and seen | flagged == trained_ids(source)  # every step's sample_ids
    assert not set(read_samples(run_dir(curated), columns=["sample_id"]).column("sample_id").to_pylist()) & flagged
    assert curated["dataset"]["train_samples"] == source["dataset"]["train_samples"] - len(flagged)
    assert all(curated["uris"][split] == source["uris"][split] for split in ("validation", "test"))
    assert lineage(curated) == {"noisy": "flagged examples left out by"}


def test_auto_on_other_training_data_leaves_nothing_out_and_says_why(noisy, flow_log):
    root, _, _ = noisy
    write_own_dir(root / "other", flipped_arrays(seed=1)[0], classes=CLASSES)
    champion = Storage(str(root / "store")).read_json(Storage(str(root / "store")).layout.champion)["run_id"]
    other = train(root / "store", "other", root / "other", exclude="auto")
    reason = f"the champion, run {champion}, was trained on other training data"
    assert other["curation"] == {"source_run": None, "label_issues": None, "count": 0, "digest": None, "reason": reason}
    assert f"exclude: nothing left out ({reason})" in flow_log
    assert other["dataset"]["train_samples"] == len(trained_ids(other))


def test_a_resumed_run_leaves_out_what_it_started_leaving_out(noisy):
    """SIGTERM mid-training of an `--exclude auto` run, another champion, the same command again: the same exclusion."""
    root, source, _ = noisy
    store = Storage(str(root / "store"))
    pointer = ChampionPointer(store)
    value, version = pointer.read()
    pointer.swap(value | {"run_id": "noisy", "model": source["uris"]["model"], "train_set": None}, version)  # the champion: noisy
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    flags = ["--dataset", "idx", "--source", str(root / "data"), "--storage", str(root / "store"), "--run-name", "resumed", "--exclude", "auto"]
    flags += [f"--{name.replace('_', '-')}={value}" for name, value in (RUN | {"epochs": 6, "checkpoint_every": 10}).items()]
    command = [sys.executable, "-m", "tapeline.cli", "train", *flags]
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    index = store.layout.run("resumed").checkpoint_index
    try:
        while not index.exists() and first.poll() is None:
            time.sleep(0.05)
        first.send_signal(signal.SIGTERM)
    finally:
        first.communicate(timeout=300)
    assert first.returncode == 143
    started = json.loads(store.layout.run("resumed").curation.read_text())
    assert started["source_run"] == "noisy" and started["count"] > 0

    value, version = pointer.read()
    pointer.swap(value | {"run_id": "curated", "train_set": None}, version)  # another champion, with other flagged examples
    assert main(["train", *flags]) == 0  # the same command again, in this process: its output is not the point
    manifest = json.loads(store.layout.run("resumed").run_json.read_text())
    assert manifest["curation"] == started
    flagged = {r["sample_id"] for r in issues_table(source).to_pylist() if r["flagged"]}
    assert not trained_ids(manifest) & flagged
    assert read_steps(run_dir(manifest), columns=["step"]).num_rows == 6 * -(-manifest["dataset"]["train_samples"] // RUN["batch_size"])


def test_an_exclude_that_names_no_run_is_refused_before_anything_is_written(noisy, capsys):
    root, _, _ = noisy
    flags = ["--dataset", "idx", "--source", str(root / "data"), "--storage", str(root / "store"), "--run-name", "nope-run"]
    assert main(["train", *flags, "--validation-size", "50", "--exclude", "nope"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"tapeline train: error: exclude 'nope': no run nope under {root / 'store'}"
    assert not (root / "store" / "runs" / "nope-run").exists()


def test_a_named_run_trained_on_other_data_is_refused_in_one_line(noisy, capsys):
    root, _, _ = noisy
    write_own_dir(root / "other-data", flipped_arrays(seed=2)[0], classes=CLASSES)
    flags = ["--dataset", "idx", "--source", str(root / "other-data"), "--storage", str(root / "store"), "--run-name", "elsewhere"]
    assert main(["train", *flags, "--validation-size", "50", "--exclude", "noisy"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        "tapeline train: error: exclude 'noisy': that run was trained on other training data, so its flagged sample_ids name other examples"
    )
    assert not (root / "store" / "runs" / "elsewhere" / "checkpoints").exists()  # refused before training


def test_a_run_without_per_example_norms_has_no_label_issues_to_show_or_exclude(noisy, capsys):
    root, _, _ = noisy
    plain = train(root / "store", "plain", root / "data", per_example_norms=False, epochs=1)
    assert plain["label_issues"] is None and plain["uris"]["label_issues"] is None
    assert main(["label-issues", "plain", "--storage", str(root / "store")]) == 2
    store = root / "store"
    assert capsys.readouterr().err.splitlines() == [
        f"tapeline label-issues: error: {store / 'runs' / 'plain'} has no label_issues.parquet (written when a run with per-example norms completes)"
    ]
    flags = ["--dataset", "idx", "--source", str(root / "data"), "--storage", str(store), "--run-name", "from-plain"]
    assert main(["train", *flags, "--validation-size", "50", "--exclude", "plain"]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "tapeline train: error: exclude 'plain': run plain has no label issues (trained without per-example norms, or before they existed)"
    )
