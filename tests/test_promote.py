"""Champion/challenger promotion and the model registry, on plain files; concurrency with real processes."""

import json
import multiprocessing

import pytest

from tasks.config import ConfigError, RunConfig
from tasks.promote import current_champion, main, model_registry, promote_if_better
from tasks.storage import Storage


def test_better_promotes_worse_does_not(tmp_path):
    storage = Storage(tmp_path)
    first = promote_if_better(storage, "a", "mnist", "runs/a/model.keras", 0.90, margin=0.0)
    assert first.promoted and first.champion is None and first.reason == "no champion yet"
    worse = promote_if_better(storage, "b", "mnist", "runs/b/model.keras", 0.89, margin=0.0)
    assert not worse.promoted and worse.champion["run_id"] == "a"
    assert "0.8900 < champion 0.9000" in worse.reason
    better = promote_if_better(storage, "c", "mnist", "runs/c/model.keras", 0.905, margin=0.0)
    assert better.promoted and current_champion(storage)["run_id"] == "c"


def test_margin_is_required(tmp_path):
    storage = Storage(tmp_path)
    promote_if_better(storage, "a", "mnist", "m", 0.90, margin=0.01)
    assert not promote_if_better(storage, "b", "mnist", "m", 0.905, margin=0.01).promoted
    assert promote_if_better(storage, "c", "mnist", "m", 0.911, margin=0.01).promoted


def test_champion_of_another_dataset_is_replaced(tmp_path):
    storage = Storage(tmp_path)
    promote_if_better(storage, "a", "mnist", "m", 0.99, margin=0.0)
    decision = promote_if_better(storage, "b", "fashion-mnist", "m", 0.85, margin=0.0)
    assert decision.promoted and "trained on mnist" in decision.reason


def _challenge(root: str, run_id: str, accuracy: float, results) -> None:
    results.put((run_id, promote_if_better(Storage(root), run_id, "mnist", "m", accuracy, margin=0.0).promoted))


def test_simultaneous_challengers_promote_one_at_a_time(tmp_path):
    """Eight processes at once, each better than the last champion it could have seen: the pointer stays whole."""
    promote_if_better(Storage(tmp_path), "base", "mnist", "m", 0.5, margin=0.0)
    results = multiprocessing.Queue()
    challengers = [multiprocessing.Process(target=_challenge, args=(str(tmp_path), f"r{i}", 0.6, results)) for i in range(8)]
    for process in challengers:
        process.start()
    for process in challengers:
        process.join(timeout=60)
    outcomes = dict(results.get(timeout=5) for _ in challengers)
    # Equal scores: the first one to take the lock wins against 0.5; the rest tie with it (>= promotes again).
    assert all(outcomes.values())
    pointer = json.loads((tmp_path / "models" / "current").read_text())
    assert pointer["run_id"] in outcomes and pointer["test_accuracy"] == 0.6
    assert not [p for p in (tmp_path / "models").iterdir() if ".tmp-" in p.name]


def test_registry_lists_runs_and_marks_the_champion(tmp_path, capsys):
    storage = Storage(tmp_path)
    for run_id, accuracy in (("20260101-000000-aaaaaa", 0.8), ("20260102-000000-bbbbbb", 0.9)):
        run_dir = tmp_path / "runs" / run_id
        run_dir.mkdir(parents=True)
        run_dir.joinpath("run.json").write_text(json.dumps({
            "run_id": run_id, "finished": "x", "dataset": {"name": "mnist", "sha256": {"train_images": "ab" * 32}},
            "parameters": {"epochs": 1, "learning_rate": 0.001, "batch_size": 32},
            "metrics": {"test_accuracy": accuracy}, "promotion": {"promoted": True},
        }))
        promote_if_better(storage, run_id, "mnist", "m", accuracy, margin=0.0)
    rows = model_registry(storage)
    assert [r["run_id"] for r in rows] == ["20260102-000000-bbbbbb", "20260101-000000-aaaaaa"]
    assert [r["current"] for r in rows] == [True, False]
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("* 20260102-000000-bbbbbb")


def test_bad_margin(tmp_path):
    with pytest.raises(ConfigError, match="promotion_margin"):
        RunConfig(storage=str(tmp_path), promotion_margin=-0.1).validated()
