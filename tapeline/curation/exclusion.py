"""Curation: training without another run's flagged examples (the train-flow parameter `exclude`, run.json's `curation`).

- `none`: nothing is left out.
- a run id of the storage root, or a run's run.json (a path or URI): the examples its
  label issues flagged (`label_issues.parquet`, column `flagged`) are left out. A run
  trained on other training data is refused: its sample_ids name other examples.
- `auto`: the current champion's flagged examples, only if it was trained on this run's
  training data (`DatasetFiles.train_set`); otherwise nothing, and one line says why.

Only the training split loses them: validation and test stay as they are, so promotion
compares on the same test set. What to exclude is chosen once, before any stage
(`choose_exclusion`), and recorded under the run before training (`curation.json`,
then run.json's `curation`): a resumed run reads its record back and leaves out the very
same examples, whatever the champion is by then.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tapeline.errors import ConfigError, TapelineError
from tapeline.registry.champion import current_champion
from tapeline.registry.warm_start import champion_train_set
from tapeline.results import split_identity
from tapeline.storage.layout import locate_run
from tapeline.storage.root import Storage

NONE, AUTO = "none", "auto"
NAMED_RUN, CHAMPION = "named run", "the champion's flagged examples"


@dataclass(frozen=True)
class ExclusionChoice:
    """What a run may leave out, read before any stage."""

    source_run: str | None  # the run whose flagged examples are left out; None: nothing is
    label_issues: str | None  # its label_issues.parquet
    reason: str  # why (or why nothing)
    train_set: str | None = None  # the source run's training data, which must be this run's

    def record(self, train_set: str, train_ids: np.ndarray) -> dict:
        """run.json's `curation` for a run on the training data `train_set` whose training split holds `train_ids`:
        `source_run`, `label_issues`, `count` (the examples left out), `digest` (of their sorted ids), `reason`."""
        if self.source_run is not None and self.train_set is not None and self.train_set != train_set:
            if self.reason == NAMED_RUN:  # its sample_ids would name other examples: refused, not guessed at
                raise TapelineError(f"exclude {self.source_run!r}: that run was trained on other training data, so its flagged sample_ids name other examples")
            return _nothing(f"the champion, run {self.source_run}, was trained on other training data")
        if self.source_run is None:
            return _nothing(self.reason)
        ids = np.intersect1d(flagged_ids(self.label_issues), train_ids)
        return {"source_run": self.source_run, "label_issues": self.label_issues, "count": len(ids), "digest": ids_digest(ids), "reason": self.reason}


def choose_exclusion(storage: Storage, exclude: str) -> ExclusionChoice:
    """What `exclude` leaves out. A named run without label issues is bad input (ConfigError)."""
    if exclude == NONE:
        return ExclusionChoice(None, None, "none asked for")
    if exclude == AUTO:
        champion = current_champion(storage)
        if champion is None:
            return ExclusionChoice(None, None, "no champion yet")
        run = storage.layout.run(champion["run_id"])
        if not storage.exists(run.label_issues):
            return ExclusionChoice(None, None, f"the champion, run {champion['run_id']}, has no label issues")
        return ExclusionChoice(champion["run_id"], storage.uri_of(run.label_issues), CHAMPION, champion_train_set(storage, champion))
    return _named_run(storage, exclude)


def _named_run(storage: Storage, exclude: str) -> ExclusionChoice:
    from tapeline.reader import NoGradientsError, find_run, read_run_json

    try:
        manifest = read_run_json(find_run(exclude, storage.uri))
    except NoGradientsError as error:  # no run there, or no run.json: not a completed run
        raise ConfigError(f"exclude {exclude!r}: {error}") from None
    uri = manifest.get("uris", {}).get("label_issues")
    if not uri:
        raise ConfigError(f"exclude {exclude!r}: run {manifest['run_id']} has no label issues (trained without per-example norms, or before they existed)")
    return ExclusionChoice(manifest["run_id"], uri, NAMED_RUN, split_identity(manifest["dataset"]["sha256"], "train"))


def flagged_ids(label_issues_uri: str) -> np.ndarray:
    """The sorted sample_ids a label_issues.parquet flags."""
    filesystem, path = _file(label_issues_uri)
    try:
        table = pq.read_table(path, columns=["sample_id", "flagged"], filesystem=filesystem)
    except (OSError, ValueError) as error:
        raise TapelineError(f"cannot read the label issues {label_issues_uri}: {error}") from None
    return np.sort(table.filter(pc.field("flagged")).column("sample_id").to_numpy())


def _file(uri: str):
    filesystem, paths = locate_run(uri.rsplit("/", 1)[0])
    return filesystem, f"{paths.directory}/{uri.rsplit('/', 1)[1]}"


def ids_digest(ids: np.ndarray) -> str:
    """The first 16 hex digits of the SHA-256 of the sorted ids as little-endian int64."""
    return hashlib.sha256(np.sort(np.asarray(ids, "<i8")).tobytes()).hexdigest()[:16]


def excluded_ids(curation: dict | None, train_ids: np.ndarray) -> np.ndarray:
    """The ids of `train_ids` that `curation` (run.json's record) leaves out; TapelineError when they are not the
    recorded ones (the source's label issues changed: a completed run's never do)."""
    if not curation or not curation.get("count"):
        return np.array([], np.int64)
    ids = np.intersect1d(flagged_ids(curation["label_issues"]), train_ids)
    if ids_digest(ids) != curation["digest"]:
        raise TapelineError(f"the examples {curation['label_issues']} flags are not the {curation['count']} this run recorded leaving out")
    return ids


def run_curation(storage: Storage, run_id: str, choice: ExclusionChoice, train_set: str, train_ids: np.ndarray) -> dict:
    """The run's `curation`: recorded under it before its first training (`curation.json`), so a resumed run reads back
    the examples it started leaving out, whatever `choice` says now."""
    path = storage.layout.run(run_id).curation
    if storage.exists(path):
        return storage.read_json(path)
    curation = choice.record(train_set, train_ids)
    storage.write_json(path, curation)
    return curation


def curation_line(curation: dict, train_examples: int) -> str:
    """What the run leaves out, in one line."""
    if not curation["count"]:
        return f"exclude: nothing left out ({curation['reason']})"
    return f"exclude: {curation['count']:,} of {train_examples:,} training examples left out, flagged by run {curation['source_run']} ({curation['reason']})"


def _nothing(reason: str) -> dict:
    return {"source_run": None, "label_issues": None, "count": 0, "digest": None, "reason": reason}


def without_excluded(curation: dict | None, images: np.ndarray, labels: np.ndarray, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A training split's (images, labels, sample_ids) without the examples `curation` leaves out."""
    keep = ~np.isin(sample_ids, excluded_ids(curation, sample_ids))
    return (images, labels, sample_ids) if keep.all() else (images[keep], labels[keep], sample_ids[keep])
