"""Retention: a completed run drops its checkpoints, and `tapeline gc` deletes what no rule keeps.

A completed run (its run.json written) is never resumed, so its checkpoints go right after
run.json (`drop_checkpoints`), unless the run was asked to keep them (`keep_checkpoints`).

`plan` decides and `collect` deletes (docs/retention.md). A run is kept when any rule keeps it:

- its lease is live: it is being written;
- it is the champion (`models/current`);
- it is one of the `keep_last` runs that finished last;
- with `older_than`, it finished less than that many days ago;
- it never completed (failed or killed, resumable from its checkpoints), unless `older_than`
  is given and its last write is older than that;
- a kept run depends on it (`lineage`): the run it warm-started from, the run whose flagged
  examples it left out, and so on up the chain.

The cache entries and prepared datasets that a kept run references are kept; the others go,
except while a kept run has no run.json (being written, or resumable): a run records what it uses
only in its run.json, at its end, so then gc leaves `cache/` and `datasets/` alone. Kept runs that completed without
`keep_checkpoints` and still hold checkpoints (older runs, or a run stopped between its run.json
and the drop) lose them.

Deleting is safe to interrupt: a run is deleted under its lease, its run.json first, renamed to
the mark `.deleting` (from then on every reader treats what is left as incomplete), then its other
files, then the mark. A run found marked and without its run.json is a deletion cut short, and the
next gc finishes it whatever the policy. A prepared dataset's manifest is renamed likewise
(`<key>.deleting` beside it), so that `prepare` makes it anew; one without its manifest and unmarked
may be being written by prepare-data, which takes no run lease, and is left until it has been idle
for an hour. Nothing of this needs free space on a local root: gc works on a full disk.
"""

from __future__ import annotations

import calendar
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tapeline.config import RetentionPolicy
from tapeline.registry.champion import current_champion
from tapeline.storage.layout import DELETING_SUFFIX, MANIFEST_SUFFIX, DatasetPaths
from tapeline.storage.lease import RunLease, RunLeaseHeld, live_holder
from tapeline.storage.root import Storage, StoredFile

DAY = 86400.0
DATA = ("cache", "dataset")  # the kinds of Removal outside runs/
# A prepared dataset without its manifest is being written, or was cut short. prepare-data takes no run lease,
# so gc deletes such a directory only once nothing has been written to it for this long.
UNFINISHED_DATASET_SECONDS = 3600.0


def lineage(run: dict) -> dict[str, str]:
    """The runs that `run` (a run.json) depends on, each with how: its parent -> "warm-start source of".

    The one reader of these fields. `warm_start.from` is the run whose model training started from
    (null: random weights; tapeline/registry/warm_start.py); older run.json files hold the champion
    pointer there, so its `run_id`. `curation.source_run` names the run whose flagged examples a
    curated run left out of its training set.
    """
    parents = {}
    warm_start = run.get("warm_start")
    if isinstance(warm_start, dict):
        warm_start = warm_start.get("from", warm_start.get("run_id"))
    if isinstance(warm_start, str):
        parents[warm_start] = "warm-start source of"
    curation = run.get("curation")
    if isinstance(curation, dict) and isinstance(curation.get("source_run"), str):
        parents.setdefault(curation["source_run"], "flagged examples left out by")
    return parents


def drop_checkpoints(storage: Storage, run_id: str) -> int:
    """Delete a completed run's checkpoints, the index first (nothing resumes from a half-deleted one); their bytes."""
    run = storage.layout.run(run_id)
    files = storage.files(run.checkpoints)
    storage.remove(run.checkpoint_index, *(file.path for file in files if file.path != run.checkpoint_index))
    storage.remove_directory(run.checkpoints)
    return sum(file.size for file in files)


@dataclass(frozen=True)
class RunState:
    """A run directory as gc finds it."""

    run_id: str
    directory: Path
    files: tuple[StoredFile, ...]
    manifest: dict | None  # run.json; None when the run never completed, or a gc deleted it
    unreadable: bool  # run.json is there but is not a run manifest
    marked: bool  # a gc began deleting it
    holder: dict | None  # who holds its lease now ({} if it does not say: a gc); None: nobody

    @property
    def completed(self) -> bool:
        return self.manifest is not None

    def age_days(self, now: float) -> float:
        """Days since it finished; for a run that never completed, since its last write."""
        if self.manifest is not None:
            return (now - calendar.timegm(time.strptime(self.manifest["finished"], "%Y-%m-%dT%H:%M:%SZ"))) / DAY
        return (now - max((file.modified for file in self.files), default=now)) / DAY


@dataclass(frozen=True)
class Removal:
    """One thing gc deletes: a run, a kept run's checkpoints, a cache entry or a prepared dataset."""

    kind: str  # "run", "checkpoints", "cache" or "dataset"
    name: str  # the run id, or the path under the root
    target: Path  # the run's, checkpoints' or dataset's directory, or the cache file
    bytes: int  # as listed when planned
    age_days: float
    why: str


@dataclass(frozen=True)
class Plan:
    removals: tuple[Removal, ...]  # in the order `collect` deletes them: runs first
    kept: dict[str, str]  # run id -> why it stays
    unmark: tuple[Path, ...]  # marks of deletions an earlier gc began on what is still whole and now kept
    data_left: str | None  # why cache/ and datasets/ were left alone, if they were


def plan(storage: Storage, policy: RetentionPolicy, now: float | None = None) -> Plan:
    """What gc would delete under `policy`, and why everything else stays."""
    now = time.time() if now is None else now
    runs = {run_id: _run_state(storage, run_id) for run_id in storage.listdir(storage.layout.runs)}
    kept = _kept_runs(storage, runs, policy, now)
    removals = [_run_removal(state, now) for run_id, state in runs.items() if run_id not in kept]
    removals += [removal for run_id in kept if (removal := _checkpoint_removal(storage, runs[run_id], now))]
    unknown = sorted(run_id for run_id in kept if not runs[run_id].completed)  # being written, resumable or unreadable
    data_left = f"run {unknown[0]} is kept, and has no readable run.json to say what it uses" if unknown else None
    unmark = [storage.layout.run(run_id).deleting for run_id in kept if runs[run_id].marked and runs[run_id].completed]
    if not unknown:
        data, stale = _data_removals(storage, [runs[run_id].manifest for run_id in kept if runs[run_id].completed], now)
        removals, unmark = removals + data, unmark + stale
    return Plan(tuple(removals), kept, tuple(unmark), data_left)


def collect(storage: Storage, planned: Plan, on_removed: Callable[[Removal], None] = lambda removal: None) -> list[Removal]:
    """Delete what `planned` lists, calling `on_removed` after each; what was removed.

    A run whose lease another process took since it was planned is left, and so are cache/ and
    datasets/ if a run is being written by then."""
    storage.remove(*planned.unmark)
    runs = [removal for removal in planned.removals if removal.kind not in DATA]
    data = [removal for removal in planned.removals if removal.kind in DATA]
    removed = [removal for removal in runs if _remove(storage, removal, on_removed)]
    if data and not _any_run_being_written(storage):  # one may have begun since the plan
        removed += [removal for removal in data if _remove(storage, removal, on_removed)]
    return removed


def _remove(storage: Storage, removal: Removal, on_removed: Callable[[Removal], None]) -> bool:
    if not _REMOVE[removal.kind](storage, removal):
        return False
    on_removed(removal)
    return True


def _run_state(storage: Storage, run_id: str) -> RunState:
    run = storage.layout.run(run_id)
    files = tuple(storage.files(run.directory))
    names = {file.path for file in files}
    manifest, unreadable = None, False
    if run.run_json in names:
        with contextlib.suppress(FileNotFoundError):  # another gc deleted it since the listing
            try:
                manifest = storage.read_json(run.run_json)
            except ValueError:
                manifest = None
            unreadable = not (isinstance(manifest, dict) and {"finished", "parameters", "dataset"} <= manifest.keys())
        manifest = None if unreadable else manifest
    return RunState(run_id, run.directory, files, manifest, unreadable, run.deleting in names, live_holder(storage, run_id))


def _kept_runs(storage: Storage, runs: dict[str, RunState], policy: RetentionPolicy, now: float) -> dict[str, str]:
    """Run id -> why gc keeps it, the strongest reason first."""
    kept = {run_id: f"being written by {_holder(state.holder)}" for run_id, state in runs.items() if state.holder is not None}
    champion = (current_champion(storage) or {}).get("run_id")
    if champion in runs:
        kept.setdefault(champion, "the champion")
    kept.update({run_id: "its run.json cannot be read" for run_id, state in runs.items() if state.unreadable and run_id not in kept})
    completed = sorted((state for state in runs.values() if state.completed), key=lambda state: (state.manifest["finished"], state.run_id))
    completed.reverse()  # the last finished first; within a second, the greater run id
    for state in completed[: policy.keep_last]:
        kept.setdefault(state.run_id, f"one of the {policy.keep_last} last finished (--keep-last)")
    for state in runs.values():
        young = policy.older_than is not None and state.age_days(now) < policy.older_than
        if state.completed and young:
            kept.setdefault(state.run_id, f"finished {state.age_days(now):.1f} days ago (--older-than)")
        elif not state.completed and state.files and not state.marked and not state.unreadable and (policy.older_than is None or young):
            kept.setdefault(state.run_id, "never completed: it can resume from its checkpoints")
    dependents = [run_id for run_id in kept if runs[run_id].completed]
    while dependents:
        child = dependents.pop()
        for parent, how in lineage(runs[child].manifest).items():
            if parent in runs and parent not in kept and (runs[parent].completed or not runs[parent].marked):
                kept[parent] = f"{how} {child}"
                dependents.append(parent)
    return kept


def _run_removal(state: RunState, now: float) -> Removal:
    why = (
        "not kept by the policy" if state.completed
        else "a deletion cut short" if state.marked
        else "never completed, and too old" if state.files
        else "empty"
    )  # fmt: skip
    return Removal("run", state.run_id, state.directory, _size(state.files), state.age_days(now), why)


def _checkpoint_removal(storage: Storage, state: RunState, now: float) -> Removal | None:
    """A kept run's checkpoints, if it completed without asking to keep them and is not being written."""
    if not state.completed or state.holder is not None or state.manifest["parameters"].get("keep_checkpoints"):
        return None
    directory = storage.layout.run(state.run_id).checkpoints
    files = [file for file in state.files if directory in file.path.parents]
    if not files:
        return None
    return Removal("checkpoints", state.run_id, directory, _size(files), state.age_days(now), "the run completed")


def _data_removals(storage: Storage, manifests: list[dict], now: float) -> tuple[list[Removal], list[Path]]:
    """The cache entries and prepared datasets that none of `manifests` (the kept runs') references; and the marks
    of deletions begun on prepared datasets that are whole again and kept."""
    layout = storage.layout
    used_cache = {layout.cache_file(run["dataset"]["name"], sha) for run in manifests for sha in run["dataset"]["sha256"].values()}
    used_data = {_prepared(storage, run) for run in manifests}
    removals = [
        Removal("cache", _relative(storage, file.path), file.path, file.size, (now - file.modified) / DAY, "no kept run uses it")
        for file in storage.files(layout.cache)
        if file.path.suffix == ".gz" and not file.path.name.startswith(".") and file.path not in used_cache
    ]
    stale = []
    for prepared, files in _prepared_datasets(storage).items():
        paths, idle = {file.path for file in files}, (now - max(file.modified for file in files)) / DAY
        complete, marked = prepared.manifest in paths, prepared.deleting in paths
        if prepared in used_data or (not complete and not marked and idle * DAY < UNFINISHED_DATASET_SECONDS):
            stale += [prepared.deleting] if marked and complete else []
            continue
        why = "no kept run uses it" if complete else "a deletion cut short" if marked else "unfinished (no manifest), idle"
        removals.append(Removal("dataset", _relative(storage, prepared.directory), prepared.directory, _size(files), idle, why))
    return removals, stale


def _prepared(storage: Storage, run: dict) -> DatasetPaths:
    """The prepared dataset a run.json names, found by its names (dataset, key) under this root."""
    return storage.layout.dataset(run["dataset"]["name"], PurePosixPath(run["dataset"]["preprocessed"]).name)


def _prepared_datasets(storage: Storage) -> dict[DatasetPaths, list[StoredFile]]:
    """Every prepared dataset under datasets/, with its files, its manifest and its mark; temporary files left out."""
    found = defaultdict(list)
    for file in storage.files(storage.layout.datasets):
        parts = file.path.relative_to(storage.layout.datasets).parts  # <dataset>/<key>/<split>, <dataset>/<key>.manifest.json
        if len(parts) >= 2 and not file.path.name.startswith("."):
            key = parts[1].removesuffix(MANIFEST_SUFFIX).removesuffix(DELETING_SUFFIX)
            found[storage.layout.dataset(parts[0], key)].append(file)
    return found


def _remove_run(storage: Storage, removal: Removal) -> bool:
    """Rename its run.json to the mark, delete the rest, then the mark; False if another process holds its lease.

    Nothing here needs free space (locally): gc must work on a full disk."""
    run = storage.layout.run(removal.name)
    with _lease(storage, removal.name) as held:
        if not held:
            return False
        if storage.exists(run.run_json):
            storage.move(run.run_json, run.deleting)  # the mark; from here on, every reader sees an incomplete run
        storage.remove(*(file.path for file in storage.files(run.directory) if file.path not in (run.deleting, run.lease)))
        storage.remove(run.deleting, run.lease)
        storage.remove_directory(run.directory)
    return True


def _remove_checkpoints(storage: Storage, removal: Removal) -> bool:
    with _lease(storage, removal.name) as held:
        if held:
            drop_checkpoints(storage, removal.name)
    return held


@contextlib.contextmanager
def _lease(storage: Storage, run_id: str) -> Iterator[bool]:
    """The run's lease held for the block (True), or False if another process holds it."""
    try:
        lease = RunLease(storage, run_id, say_who=False).__enter__()  # which needs no free space: gc may be freeing it
    except RunLeaseHeld:
        yield False
        return
    try:
        yield True
    finally:
        lease.__exit__(None, None, None)


def _remove_cache_entry(storage: Storage, removal: Removal) -> bool:
    storage.remove(removal.target)
    return True


def _remove_dataset(storage: Storage, removal: Removal) -> bool:
    """Rename its manifest to the mark (from then on `prepare` and every reader treat the dataset as absent), delete
    the splits, then the mark."""
    prepared = DatasetPaths(removal.target)
    if storage.exists(prepared.manifest):
        storage.move(prepared.manifest, prepared.deleting)  # the mark; from here on, `prepare` makes it anew
    storage.remove(*(file.path for file in storage.files(prepared.directory)))
    storage.remove_directory(prepared.directory)
    storage.remove(prepared.deleting)
    return True


_REMOVE = {"run": _remove_run, "checkpoints": _remove_checkpoints, "cache": _remove_cache_entry, "dataset": _remove_dataset}


def _any_run_being_written(storage: Storage) -> bool:
    return any(live_holder(storage, run_id) is not None for run_id in storage.listdir(storage.layout.runs))


def _holder(holder: dict) -> str:
    return f"{holder['host']} pid {holder['pid']}" if "host" in holder else "another process"


def _size(files) -> int:
    return sum(file.size for file in files)


def _relative(storage: Storage, path: Path) -> str:
    return path.relative_to(storage.root).as_posix()


# For a terminal: one line a run kept or a thing deleted, then the total.

NOUNS = {
    "run": ("run", "runs"),
    "checkpoints": ("run's checkpoints", "runs' checkpoints"),
    "cache": ("cache entry", "cache entries"),
    "dataset": ("prepared dataset", "prepared datasets"),
}


def kept_lines(planned: Plan) -> list[str]:
    lines = [f"keep    {'run':<11} {run_id:<36} {why}" for run_id, why in planned.kept.items()]
    if planned.data_left:
        lines.append(f"keep    cache/ and datasets/: {planned.data_left}")
    return lines


def removal_line(removal: Removal, verb: str) -> str:
    return f"{verb:<7} {removal.kind:<11} {removal.name:<36} {removal.age_days:6.1f} days {removal.bytes:>14,} bytes  {removal.why}"


def total_line(removals: list[Removal] | tuple[Removal, ...], dry_run: bool) -> str:
    total = sum(removal.bytes for removal in removals)
    counts = {kind: sum(removal.kind == kind for removal in removals) for kind in NOUNS}
    what = ", ".join(f"{count} {NOUNS[kind][count != 1]}" for kind, count in counts.items() if count) or "nothing"
    if dry_run:
        return f"dry run: would free {total:,} bytes ({total / 2**20:.1f} MiB) of {what}; --yes deletes them"
    return f"freed {total:,} bytes ({total / 2**20:.1f} MiB): {what}"
