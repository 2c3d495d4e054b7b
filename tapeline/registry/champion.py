"""The champion pointer, `<storage>/models/current`: which run's model is the current one.

A small JSON object (docs/data-format.md), replaced
only by compare-and-swap (see tapeline/storage/versioned.py): two runs that finish at once
cannot both win against the same champion, and nobody ever reads a torn pointer.
"""

from __future__ import annotations

from tapeline.errors import TapelineError
from tapeline.storage.root import Storage
from tapeline.storage.versioned import VersionedObject


class ChampionPointer(VersionedObject):
    def __init__(self, storage: Storage):
        super().__init__(storage, storage.layout.champion)


def current_champion(storage: Storage) -> dict | None:
    return ChampionPointer(storage).read()[0]


def warm_start_champion(storage: Storage, dataset: str) -> dict | None:
    """The champion a `--warm-start` run starts from: the current one, if it was trained on `dataset`."""
    champion = current_champion(storage)
    if champion is None or champion["dataset"] != dataset:
        return None
    if not storage.exists(storage.path_of(champion["model"])):
        raise TapelineError(f"warm start: the champion's model {champion['model']} is missing")
    return champion
