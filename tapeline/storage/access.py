"""Whether a storage root can be used, asked before any stage runs: a directory we can create files in, or a bucket
that exists and takes these credentials. Nothing is left behind either way."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from tapeline.errors import ConfigError
from tapeline.storage.layout import is_remote, remote_filesystem
from tapeline.storage.versioned import s3_client


def usable_root(storage: str) -> str:
    """The root as runs record it (an absolute path, or the URI without a trailing slash); ConfigError if unusable."""
    return _reachable_root(storage) if is_remote(storage) else str(_writable_root(storage))


def existing_root(storage: str) -> str:
    """A root to read and clean up: like `usable_root`, but a local one must exist already (ConfigError)."""
    root = usable_root(storage)
    if not is_remote(root) and not Path(root).is_dir():
        raise ConfigError(f"no storage root at {storage}")
    return root


def _reachable_root(storage: str) -> str:
    """Ask the object store now whether the bucket exists and takes these credentials; write nothing.

    Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_PROFILE, …), and
    the endpoint from AWS_ENDPOINT_URL: neither is in any message.
    """
    try:
        if storage.startswith("s3://"):
            s3_client()  # boto3, for the champion pointer and the run lease: before any stage needs it
        filesystem, path = remote_filesystem(storage)
        bucket = path.split("/")[0]
        if filesystem.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ConfigError(f"bucket {bucket!r} does not exist")
        filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))  # listing needs read access
    except (OSError, ValueError, ImportError) as error:  # a ConfigError is a ValueError
        raise ConfigError(f"storage {storage!r}: {' '.join(str(error).split())}") from None
    return storage.rstrip("/")


def _writable_root(storage: str) -> Path:
    path = Path(storage.removeprefix("file://")).expanduser().resolve()
    # The root may not exist yet: it will be created under its nearest existing ancestor.
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"storage {storage!r}: {existing} is not a directory")
    _probe_write(storage, existing)
    return path


def _probe_write(storage: str, directory: Path) -> None:
    """Create and remove a file: os.access says yes to root everywhere, even in /proc or on a read-only mount."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".tapeline-probe-"):
            pass
    except OSError as error:
        raise ConfigError(f"storage {storage!r}: cannot create files in {directory} ({error.strerror or error})") from None
