"""The storage root: where every stage reads and writes, and how it writes safely.

Layout under the root:

    cache/<dataset>/<idx sha256>.gz          verified dataset files, content-addressed
    datasets/<dataset>/<key>/                 preprocessed splits (Parquet) + manifest.json
    runs/<run_id>/run.json                    the run manifest
    runs/<run_id>/model.keras                 the trained model
    runs/<run_id>/gradients/                  gradient snapshots (Parquet dataset + _manifest.json)
    runs/<run_id>/steps/, stats/              per step, per (step, variable) (Parquet datasets)
                                              (all three hive-partitioned: epoch=<N>/ directories)
    runs/<run_id>/checkpoints/, tensorboard/  resume state, TensorBoard scalars

Nothing that looks complete is ever half-written: files are written under a
temporary name in the same directory and renamed into place, which is atomic on
a POSIX filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Iterator

TEMP_MARK = ".tmp-"  # temporary names contain this; readers skip them


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds.

    The temporary name keeps the suffix (Keras insists on `.keras`, Parquet tools
    like `.parquet`) and starts with a dot so globs for complete files skip it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}{TEMP_MARK}{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.is_dir():
            shutil.rmtree(temporary)
        elif temporary.exists():
            temporary.unlink()


def write_json(path: Path, value) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + "\n")


def read_json(path: Path):
    return json.loads(path.read_text())


def sha256_file(path: Path) -> str:
    with path.open("rb") as handle:
        return sha256_stream(handle)


def sha256_stream(handle) -> str:
    digest = hashlib.sha256()
    while chunk := handle.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def content_key(value) -> str:
    """A short, stable key for a JSON-able value (used to name cache entries)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


class Storage:
    """The storage root of one deployment of tapeline (a local directory for now)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def cache_file(self, dataset: str, idx_sha256: str) -> Path:
        return self.root / "cache" / dataset / f"{idx_sha256}.gz"

    def dataset_dir(self, dataset: str, key: str) -> Path:
        return self.root / "datasets" / dataset / key

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id
