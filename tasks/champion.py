"""The champion pointer, `<storage>/models/current`: which run's model is the current one.

A small JSON object (run_id, dataset, model, test_accuracy, promoted), replaced
only by compare-and-swap: read it with its version, decide, and write only if it
is still that version. Two runs that finish at once cannot both win against the
same champion, and nobody ever reads a torn pointer. On a local root the swap
holds a lock file and renames a temporary file into place; on S3 it is a
conditional write (If-Match on the version read, If-None-Match for the first),
which S3 and S3-compatible servers check atomically. Other object stores have
no conditional write here: there the pointer is replaced whole but not
serialised.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

from tasks.config import TapelineError
from tasks.storage import Storage, write_json


class ChampionPointer:
    def __init__(self, storage: Storage):
        self.storage, self.path = storage, storage.root / "models" / "current"

    def read(self) -> tuple[dict | None, str | None]:
        """(the champion or None, the version to pass to `swap`)."""
        if self.storage.remote and self.storage.uri.startswith("s3://"):
            return self._read_s3()
        if not self.storage.exists(self.path):
            return None, None
        text = self.storage.fetch(self.path).read_text()
        return json.loads(text), text

    def swap(self, champion: dict, version: str | None) -> bool:
        """Make `champion` current if the pointer is still at `version`; False if another run got there first."""
        if self.storage.remote and self.storage.uri.startswith("s3://"):
            return self._swap_s3(champion, version)
        if self.storage.remote:  # no conditional write: replaced whole, not serialised
            self.storage.write_json(self.path, champion)
            return True
        with self._lock():
            current = self.path.read_text() if self.path.exists() else None
            if current != version:
                return False
            write_json(self.path, champion)
            return True

    @contextlib.contextmanager
    def _lock(self):
        lock = self.path.with_name(".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even if the process dies
            yield

    def _s3_object(self) -> tuple:
        import boto3  # endpoint and credentials from the environment, as for pyarrow

        bucket, _, prefix = self.storage.uri.removeprefix("s3://").partition("/")
        key = "/".join(part for part in (prefix, "models", "current") if part)
        return boto3.client("s3"), bucket, key

    def _read_s3(self) -> tuple[dict | None, str | None]:
        client, bucket, key = self._s3_object()
        try:
            response = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            return None, None
        return json.loads(response["Body"].read()), response["ETag"]

    def _swap_s3(self, champion: dict, version: str | None) -> bool:
        client, bucket, key = self._s3_object()
        condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        try:
            client.put_object(Bucket=bucket, Key=key, Body=json.dumps(champion, indent=2).encode(), **condition)
        except client.exceptions.ClientError as error:
            if error.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True


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
