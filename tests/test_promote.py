"""Champion/challenger promotion and the model registry, on plain files; concurrency with real processes."""

import json
import multiprocessing

import pytest

from tapeline.cli import main
from tapeline.config import RunConfig
from tapeline.errors import ConfigError
from tapeline.registry.champion import ChampionPointer, current_champion
from tapeline.registry.listing import model_registry, registry_table
from tapeline.registry.promotion import promote_if_better
from tapeline.storage.root import Storage
from tapeline.tasks.promote import promotion_markdown


def test_better_promotes_worse_does_not(tmp_path):
    storage = Storage(tmp_path)
    first = promote_if_better(storage, "a", "mnist", "mnist-test", "runs/a/model.keras", 0.90, margin=0.0)
    assert first.promoted and first.champion is None and first.reason == "no champion yet"
    worse = promote_if_better(storage, "b", "mnist", "mnist-test", "runs/b/model.keras", 0.89, margin=0.0)
    assert not worse.promoted and worse.champion["run_id"] == "a"
    assert "0.8900 < champion 0.9000" in worse.reason
    better = promote_if_better(storage, "c", "mnist", "mnist-test", "runs/c/model.keras", 0.905, margin=0.0)
    assert better.promoted and current_champion(storage)["run_id"] == "c"


def test_margin_is_required(tmp_path):
    storage = Storage(tmp_path)
    promote_if_better(storage, "a", "mnist", "mnist-test", "m", 0.90, margin=0.01)
    assert not promote_if_better(storage, "b", "mnist", "mnist-test", "m", 0.905, margin=0.01).promoted
    assert promote_if_better(storage, "c", "mnist", "mnist-test", "m", 0.911, margin=0.01).promoted


def test_champion_of_another_dataset_is_replaced(tmp_path):
    storage = Storage(tmp_path)
    promote_if_better(storage, "a", "mnist", "mnist-test", "m", 0.99, margin=0.0)
    decision = promote_if_better(storage, "b", "fashion-mnist", "fashion-mnist-test", "m", 0.85, margin=0.0)
    assert decision.promoted and "tested on another test set (mnist)" in decision.reason


def test_a_pointer_without_a_test_set_compares_by_dataset(tmp_path):
    """Champions promoted before test sets were recorded stay yardsticks for their dataset."""
    storage = Storage(tmp_path)
    pointer = ChampionPointer(storage)
    pointer.swap({"run_id": "old", "dataset": "mnist", "model": "m", "test_accuracy": 0.95, "promoted": "x"}, None)
    assert not promote_if_better(storage, "b", "mnist", "mnist-test", "m", 0.94, margin=0.0).promoted
    assert promote_if_better(storage, "c", "fashion-mnist", "fashion-mnist-test", "m", 0.85, margin=0.0).promoted


@pytest.mark.parametrize("where", ["local", "s3"])
def test_pointer_swap_refuses_a_stale_version(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3").uri(f"swap-{tmp_path.name}")
    pointer = ChampionPointer(Storage(root))
    assert pointer.read() == (None, None)
    assert pointer.swap({"run_id": "a"}, None) and not pointer.swap({"run_id": "late"}, None)
    champion, version = pointer.read()
    assert champion == {"run_id": "a"} and pointer.swap({"run_id": "b"}, version)
    assert not pointer.swap({"run_id": "stale"}, version)  # a decision taken against "a"
    assert pointer.read()[0] == {"run_id": "b"}


def _challenge(root: str, run_id: str, accuracy: float, results) -> None:
    results.put((run_id, promote_if_better(Storage(root), run_id, "mnist", "mnist-test", "m", accuracy, margin=0.0).promoted))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_simultaneous_challengers_leave_the_best_as_champion(where, tmp_path, request):
    """Eight processes at once: whatever the interleaving, the best one ends as champion and the pointer stays whole."""
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3").uri(f"race-{tmp_path.name}")
    promote_if_better(Storage(root), "base", "mnist", "mnist-test", "m", 0.5, margin=0.0)
    accuracies = {f"r{i}": accuracy for i, accuracy in enumerate((0.53, 0.58, 0.51, 0.55, 0.57, 0.52, 0.56, 0.54))}
    results = multiprocessing.Queue()
    challengers = [multiprocessing.Process(target=_challenge, args=(root, run_id, accuracy, results)) for run_id, accuracy in accuracies.items()]
    for process in challengers:
        process.start()
    for process in challengers:
        process.join(timeout=60)
    outcomes = dict(results.get(timeout=5) for _ in challengers)
    assert outcomes["r1"]  # 0.58 beats every champion it could have met
    assert current_champion(Storage(root))["run_id"] == "r1"
    if where == "local":
        assert not [p for p in (tmp_path / "models").iterdir() if p.name.endswith(".tmp")]


def test_registry_lists_runs_and_marks_the_champion(tmp_path, capsys):
    storage = Storage(tmp_path)
    runs = (("20260101-000000-aaaaaa", 0.8), ("20260102-000000-bbbbbb", 0.912345678), ("20260103-000000-cccccc", 0.85))
    for run_id, accuracy in runs:
        decision = promote_if_better(storage, run_id, "mnist", "mnist-test", "m", accuracy, margin=0.0)
        run_dir = tmp_path / "runs" / run_id
        run_dir.mkdir(parents=True)
        run_dir.joinpath("run.json").write_text(
            json.dumps(
                {
                    "run_id": run_id,
                    "finished": "x",
                    "dataset": {"name": "mnist", "sha256": {"train_images": "ab" * 32}},
                    "parameters": {"epochs": 1, "learning_rate": 0.001, "batch_size": 32},
                    "metrics": {"test_accuracy": accuracy},
                    "promotion": {"promoted": decision.promoted},
                }
            )
        )
    rows = model_registry(storage)
    assert [r["run_id"] for r in rows] == ["20260103-000000-cccccc", "20260102-000000-bbbbbb", "20260101-000000-aaaaaa"]
    assert [r["current"] for r in rows] == [False, True, False]
    assert main(["models", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("* 20260102-000000-bbbbbb")
    # Prefect's table: what a person compares, rounded, the champion's status in words.
    table = registry_table(rows)
    assert table[1] == {
        "run": "20260102-000000-bbbbbb", "status": "champion", "test accuracy": 0.9123, "dataset": "mnist", "model": "tapeline.model:cnn",
        "epochs": 1, "batch": 32, "lr": 0.001, "checkpoints": "dropped",
    }  # fmt: skip
    assert [row["status"] for row in table] == ["not promoted", "champion", "was champion"]


def test_promotion_is_a_table_of_both_models(tmp_path):
    storage = Storage(tmp_path)
    first = promotion_markdown(promote_if_better(storage, "a", "mnist", "mnist-test", "m", 0.9, margin=0.01))
    assert "## Run `a`: promoted" in first and "Reason: no champion yet." in first
    assert [line for line in first.splitlines() if line.startswith("| challenger") or line.startswith("| champion")] == [
        "| challenger | `a` | mnist | 0.9000 | promoted | 0.01 |"
    ]
    second = promotion_markdown(promote_if_better(storage, "b", "mnist", "mnist-test", "m", 0.905, margin=0.01)).splitlines()
    assert second[0] == "## Run `b`: not promoted"
    assert second[-2:] == [
        "| challenger | `b` | mnist | 0.9050 | not promoted | 0.01 |",
        "| champion | `a` | mnist | 0.9000 | stays current |  |",
    ]


def test_bad_margin(tmp_path):
    with pytest.raises(ConfigError, match="promotion_margin"):
        RunConfig(storage=str(tmp_path), promotion_margin=-0.1).validated()
