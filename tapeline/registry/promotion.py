"""Champion and challenger: a run's model becomes the current one only if it is better.

A challenger replaces the champion (`<storage>/models/current`, see
tapeline/registry/champion.py) when its test accuracy is at least the champion's plus
`promotion_margin`; the decision is made against the pointer as it is when the
new one is written (compare-and-swap), so two runs finishing at once cannot both
win against the same champion. A champion tested on another test set (another
dataset, or another `--dataset idx` directory) is no yardstick: the challenger
replaces it.
"""

from __future__ import annotations

from tapeline.registry.champion import ChampionPointer
from tapeline.results import Promotion
from tapeline.storage.root import Storage, utc_now


def promote_if_better(
    storage: Storage, run_id: str, dataset: str, test_set: str, model_uri: str, test_accuracy: float, margin: float,
    *, train_set: str | None = None,
) -> Promotion:  # fmt: skip
    """`test_set`: DatasetFiles.test_set, the identity of the split `test_accuracy` was measured on; `train_set`:
    DatasetFiles.train_set, the data the model was trained on, which a warm start must share (None: not known)."""
    challenger = {
        "run_id": run_id, "dataset": dataset, "train_set": train_set, "test_set": test_set, "model": model_uri,
        "test_accuracy": test_accuracy,
    }  # fmt: skip
    pointer = ChampionPointer(storage)
    while True:  # until the decision is made against the pointer as it still is
        champion, version = pointer.read()
        if champion is None:
            promoted, reason = True, "no champion yet"
        elif not _same_test_set(champion, challenger):
            promoted, reason = True, f"the champion was tested on another test set ({champion['dataset']})"
        else:
            promoted = test_accuracy >= champion["test_accuracy"] + margin
            reason = f"test accuracy {test_accuracy:.4f} {'>=' if promoted else '<'} champion {champion['test_accuracy']:.4f} + margin {margin:g}"
        if not promoted or pointer.swap({**challenger, "promoted": utc_now()}, version):
            return Promotion(promoted=promoted, reason=reason, margin=margin, challenger=challenger, champion=champion)


def _same_test_set(champion: dict, challenger: dict) -> bool:
    if "test_set" not in champion:  # a pointer written before test sets were recorded: registry datasets only
        return champion["dataset"] == challenger["dataset"]
    return champion["test_set"] == challenger["test_set"]
