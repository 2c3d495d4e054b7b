"""A small JSON object in the storage root, replaced only by compare-and-swap.

Read it with its version, decide, and write only if it is still that version:
two processes that decide at once cannot both win, and nobody ever reads a torn
object. On a local root a swap holds a lock file and renames a temporary file
into place; on S3 it is a conditional write (If-Match on the version read,
If-None-Match for a first write), which S3 and S3-compatible servers check
atomically. Other object stores have no conditional write here: a run refuses them
(`require_conditional_writes`) unless told to accept the risk, and there the object is
replaced whole but not serialised. The champion pointer (tapeline/registry/champion.py)
and the run lease (tapeline/storage/lease.py) are such objects.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path

from tapeline.errors import ConfigError, CorruptFileError
from tapeline.storage.layout import is_remote
from tapeline.storage.root import Storage

_LOST_RACE = ("PreconditionFailed", "ConditionalRequestConflict")


def s3_client():
    """boto3's S3 client, endpoint and credentials from the environment as for pyarrow; boto3 comes with the s3 extra."""
    try:
        import boto3
    except ImportError:
        raise ConfigError("S3 storage needs the s3 extra: pip install 'tapeline[s3]'") from None
    return boto3.client("s3")


def require_conditional_writes(storage: str, accept_unlocked: bool) -> None:
    """Refuse a root whose store gives no conditional write here, unless the run accepts that risk (ConfigError)."""
    if is_remote(storage) and not storage.startswith("s3://") and not accept_unlocked:
        scheme = storage.split("://")[0]
        raise ConfigError(
            f"storage {storage!r}: {scheme}:// has no conditional write here, so two writers of one run or two promotions "
            "would not be kept apart; use a local directory or s3://, or pass --accept-unlocked-storage to take that risk"
        )


class VersionedObject:
    if_removed = ""  # what removing the object means, for the message that asks a user to

    def __init__(self, storage: Storage, path: Path):
        self.storage, self.path = storage, path
        self._s3 = storage.remote and storage.uri.startswith("s3://")

    def read(self) -> tuple[dict | None, str | None]:
        """(the value or None, the version to pass to `swap`)."""
        if self._s3:
            return self._read_s3()
        if not self.storage.exists(self.path):
            return None, None
        text = self.storage.fetch(self.path).read_text()
        return self._parsed(text), text

    def _parsed(self, text: str | bytes) -> dict:
        """The object's value; CorruptFileError, in one line, when it is not a JSON object (torn, or edited by hand)."""
        try:
            value = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            value, reason = None, f"not valid JSON ({error})"
        else:
            reason = None if isinstance(value, dict) else f"a JSON {type(value).__name__}, not an object"
        if reason:
            raise CorruptFileError(
                f"{self.storage.uri_of(self.path)} is {reason}: tapeline replaces it whole, so it was damaged or edited by hand; "
                f"restore it from a backup, or remove it{self.if_removed}"
            )
        return value

    def swap(self, value: dict, version: str | None) -> str | None:
        """Write `value` if the object is still at `version` (None: only if absent).

        Returns the new version, or None if another writer got there first.
        """
        if self._s3:
            return self._swap_s3(value, version)
        if self.storage.remote:  # no conditional write: replaced whole, not serialised
            self.storage.write_json(self.path, value)
            return self.path.read_text()
        with self._lock():
            current = self.path.read_text() if self.path.exists() else None
            if current != version:
                return None
            self.storage.write_json(self.path, value)
            return self.path.read_text()

    def delete(self) -> None:
        if self._s3:
            client, bucket, key = self._s3_object()
            client.delete_object(Bucket=bucket, Key=key)
        else:
            self.storage.remove(self.path)

    @contextlib.contextmanager
    def _lock(self):
        lock = self.path.with_name(".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes, even if the process dies
            yield

    def _s3_object(self) -> tuple:
        bucket, _, prefix = self.storage.uri.removeprefix("s3://").partition("/")
        relative = self.path.relative_to(self.storage.root).as_posix()
        return s3_client(), bucket, "/".join(part for part in (prefix, relative) if part)

    def _read_s3(self) -> tuple[dict | None, str | None]:
        client, bucket, key = self._s3_object()
        try:
            response = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            return None, None
        return self._parsed(response["Body"].read()), response["ETag"]

    def _swap_s3(self, value: dict, version: str | None) -> str | None:
        client, bucket, key = self._s3_object()
        condition = {"IfMatch": version} if version else {"IfNoneMatch": "*"}
        try:
            response = client.put_object(Bucket=bucket, Key=key, Body=json.dumps(value, indent=2).encode(), **condition)
        except client.exceptions.ClientError as error:
            if error.response["Error"]["Code"] in _LOST_RACE:
                return None
            raise
        return response["ETag"]
