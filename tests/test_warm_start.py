"""Warm start from the champion only when it was trained on the run's own training data, or from a run named for it."""

import json

import keras
import numpy as np
import pytest

from tapeline.cli import main
from tapeline.flows.train import train_flow
from tapeline.model import build_model
from tapeline.reader import gradient_arrays
from tapeline.registry.champion import ChampionPointer, current_champion
from tapeline.registry.warm_start import choose_warm_start
from tapeline.results import split_identity
from tapeline.storage.root import Storage
from tests.helpers import tiny_arrays, write_own_dir

RUN = {"epochs": 1, "validation_size": 50, "steps_per_call": 4, "snapshot_every": 4, "snapshot_weights": True}


def train(storage, name: str, source, **parameters) -> dict:
    return train_flow(dataset="idx", source=str(source), storage=str(storage), run_name=name, **RUN, **parameters)


def first_weights(run: dict) -> list[np.ndarray]:
    """The weights the run's first step started from (its step-1 snapshot), in variable order."""
    weights = gradient_arrays(run["uris"]["gradients"].removesuffix("/gradients"), step=1, field="weights")
    return list(weights.values())


def model_weights(run: dict) -> list[np.ndarray]:
    return [variable.numpy() for variable in keras.saving.load_model(run["uris"]["model"]).trainable_variables]


def same(left: list[np.ndarray], right: list[np.ndarray]) -> bool:
    return len(left) == len(right) and all(np.array_equal(a, b) for a, b in zip(left, right, strict=True))


@pytest.mark.usefixtures("prefect_api")
def test_warm_start_takes_the_champion_only_on_its_training_data_or_a_named_run(tmp_path, flow_log, capsys):
    store, arrays = tmp_path / "store", tiny_arrays(seed=0)
    for name, data in (("a", arrays), ("a-copy", arrays), ("b", tiny_arrays(seed=1))):
        write_own_dir(tmp_path / name, data)
    champion = train(store, "a", tmp_path / "a")

    # Another directory with the same files: the same training data, the champion's weights.
    again = train(store, "a2", tmp_path / "a-copy", warm_start=True)
    assert again["warm_start"] == {"from": "a", "model": champion["uris"]["model"], "reason": "champion, same data"}
    assert same(first_weights(again), model_weights(champion))
    assert "warm start from run a (champion, same data)" in flow_log

    # Other training data: one line, and random weights (the seed's), not the champion's.
    now = current_champion(Storage(store))["run_id"]
    other = train(store, "b", tmp_path / "b", warm_start=True)
    reason = f"the champion, run {now}, was trained on other training data"
    assert other["warm_start"] == {"from": None, "model": None, "reason": reason}
    assert f"warm start: {reason}; starting from random weights" in flow_log
    seeded = build_model(seed=other["parameters"]["seed"])  # as training builds it: not from the global `random` Prefect's threads draw from
    assert same(first_weights(other), [variable.numpy() for variable in seeded.trainable_variables])

    # Named, a run is the start whatever its data.
    named = train(store, "c", tmp_path / "b", warm_start_from="a")
    assert named["warm_start"] == {"from": "a", "model": champion["uris"]["model"], "reason": "named run"}
    assert named["parameters"]["warm_start"] and same(first_weights(named), model_weights(champion))

    # A name that is no completed run: one line, exit 2, before anything is written.
    flags = ["--dataset", "idx", "--source", str(tmp_path / "b"), "--storage", str(store), "--run-name", "d", "--warm-start-from", "nope"]
    flags += ["--validation-size", str(RUN["validation_size"])]
    assert main(["train", *flags]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"tapeline train: error: warm_start_from 'nope': {store} has no completed run of that name (no runs/nope/run.json)"
    )
    assert not (store / "runs" / "d").exists()


def test_a_pointer_written_before_training_data_was_recorded_is_read_through_its_run(tmp_path):
    storage = Storage(tmp_path)
    digests = {split: f"{index}" * 64 for index, split in enumerate(("train_images", "train_labels", "test_images", "test_labels"))}
    run = storage.layout.run("old")
    run.directory.mkdir(parents=True)
    run.model.write_bytes(b"a model")
    pointer = {"run_id": "old", "dataset": "idx", "test_set": "t", "model": str(run.model), "test_accuracy": 0.9, "promoted": "then"}
    ChampionPointer(storage).swap(pointer, None)
    choice = choose_warm_start(storage, warm_start=True, warm_start_from=None, variables=[])
    assert choice.record("any")["reason"] == "the champion, run old, was trained on training data it does not record"
    run.run_json.write_text(json.dumps({"dataset": {"sha256": digests}}))
    choice = choose_warm_start(storage, warm_start=True, warm_start_from=None, variables=[])
    assert choice.record(split_identity(digests, "train"))["from"] == "old"
    assert choice.record(split_identity({**digests, "train_labels": "f" * 64}, "train"))["from"] is None
