"""The champion pointer, `<storage>/models/current`: which run's model is the current one.

A small JSON object (docs/data-format.md), replaced
only by compare-and-swap (see tapeline/storage/versioned.py): two runs that finish at once
cannot both win against the same champion, and nobody ever reads a torn pointer.
"""

from __future__ import annotations

from tapeline.storage.root import Storage
from tapeline.storage.versioned import VersionedObject


class ChampionPointer(VersionedObject):
    if_removed = " (then no model is current until a run is promoted)"

    def __init__(self, storage: Storage):
        super().__init__(storage, storage.layout.champion)


def current_champion(storage: Storage) -> dict | None:
    return ChampionPointer(storage).read()[0]
