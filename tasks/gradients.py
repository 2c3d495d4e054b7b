"""The gradient schema, and the writers that persist it during training.

Three Parquet datasets under a run, each hive-partitioned by epoch: a file lives
in `<dataset>/epoch=<N>/` and does not hold the `epoch` column, the directory name
supplies it (declared int32 by PARTITIONING). The schemas below are the datasets'
as read; `file_schema` is what a file holds.

`gradients/` — full snapshots, one row per (step, variable), one file per step
(`epoch=<N>/step-<step>.parquet`):
    run_id string, epoch int32, step int64, variable string,
    shape list<int32>, values large_list<float32> (flattened in C order),
    l2_norm float32 (of the float32 gradient, the same as in `stats/`, so reports
        never need to read `values`),
    reason string (why this step was kept in full: first, scheduled, last,
    non-finite, norm-spike; comma-separated when several).
The values are the gradients exactly as `tape.gradient` returned them, before
the optimizer applied them.

`steps/` — one row per training step, and `stats/` — one row per (step,
variable), computed on the device right after each step; one file each per stretch
between checkpoints (`epoch=<N>/steps-<first step>.parquet`, `stats-…`):
    steps: step int64, epoch int32, loss float32, global_norm float32,
           learning_rate float32, sample_ids list<int64>
    stats: step int64, epoch int32, variable string, l2_norm, mean, std,
           max_abs, zero_fraction float32, nan_count, inf_count int64
`sample_ids` are values of the training split's `sample_id` column. A NaN or
Inf in a gradient shows in its float statistics too; `nan_count` and
`inf_count` say how many there were.

Files appear under their final name only when complete (see tasks/storage.py).
"""

from __future__ import annotations

import collections
import queue
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tasks.storage import MANIFEST_SUFFIX, Storage, atomic_path

MANIFEST = "gradients" + MANIFEST_SUFFIX  # beside gradients/: the complete files, written last by export_gradients
GRADIENT_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
# Pyarrow refuses a column that is also a hive key, so the directory alone holds the
# epoch. Declared, not inferred: inference would make it a dictionary (pq.read_table)
# or a category sorted as text (pandas).
PARTITIONING = ds.partitioning(pa.schema([("epoch", pa.int32())]), flavor="hive")


def gradient_schema(dtype: str = "float32") -> pa.Schema:
    """The snapshot schema; `values` and `weights` are stored in `dtype` (statistics are always float32)."""
    stored = GRADIENT_DTYPES[dtype]
    return pa.schema(
        [
            ("run_id", pa.string()),
            ("epoch", pa.int32()),
            ("step", pa.int64()),
            ("variable", pa.string()),
            ("shape", pa.list_(pa.int32())),
            ("values", pa.large_list(stored)),
            ("l2_norm", pa.float32()),
            ("reason", pa.string()),
            ("weights", pa.large_list(stored)),  # null unless the run records weights
        ]
    )


GRADIENT_SCHEMA = gradient_schema()
STEP_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.int32()),
        ("loss", pa.float32()),
        ("global_norm", pa.float32()),
        ("learning_rate", pa.float32()),
        ("sample_ids", pa.list_(pa.int64())),
    ]
)
STAT_NAMES = ("l2_norm", "mean", "std", "max_abs", "zero_fraction", "nan_count", "inf_count")
STATS_SCHEMA = pa.schema(
    [("step", pa.int64()), ("epoch", pa.int32()), ("variable", pa.string())]
    + [(name, pa.int64() if name.endswith("_count") else pa.float32()) for name in STAT_NAMES]
)


def file_schema(schema: pa.Schema) -> pa.Schema:
    """What a file of the dataset holds: its schema without the partition column."""
    return schema.remove(schema.get_field_index("epoch"))


def partition_file(directory: Path, epoch: int, name: str) -> Path:
    return directory / f"epoch={epoch}" / name


def atomic_partition_path(path: Path):
    """`atomic_path` for a `partition_file` of a dataset: staged beside the dataset's directory, in
    `path.parents[2]`, so a reader of the directory (Polars takes hidden files too) never meets it."""
    return atomic_path(path, staging=path.parents[2])


def write_partition_file(storage: Storage, path: Path, table: pa.Table, **options) -> None:
    """Write `table` to `path`, a `partition_file` of a dataset, whole or not at all, and publish it."""
    with atomic_partition_path(path) as temporary:
        pq.write_table(table, temporary, **options)
    storage.publish(path)  # an upload, for an object store


# Dictionary encoding of floats is slow and grows the file; BYTE_STREAM_SPLIT
# groups the exponent bytes together so zstd can find their redundancy. Min/max
# statistics only for the columns a reader filters on: on the tensors they would
# cost a pass over every value (about 15% of the write) and serve no query.
PARQUET_OPTIONS = dict(
    compression="zstd",
    use_dictionary=["run_id", "variable"],
    column_encoding={"values.list.element": "BYTE_STREAM_SPLIT", "weights.list.element": "BYTE_STREAM_SPLIT"},
    write_statistics=["run_id", "step", "variable", "l2_norm", "reason"],
)


def snapshot_file(directory: Path, epoch: int, step: int) -> Path:
    return partition_file(directory, epoch, f"step-{step:09d}.parquet")


def snapshot_table(
    run_id: str,
    step: int,
    reason: str,
    variables: list[str],
    gradients: list[np.ndarray],
    norms: list[float],
    weights: list[np.ndarray] | None = None,
    dtype: str = "float32",
) -> pa.Table:
    """One snapshot; `norms` are the gradients' L2 norms as `gradient_stats` computed them (on float32).

    A C-contiguous tensor already in `dtype` is not copied: it becomes one chunk of its
    column, zero-copy. (Cast to float16 on the device: numpy's cast runs at ~130 MB/s here.)
    """
    n = len(variables)
    schema = file_schema(gradient_schema(dtype))
    stored = np.dtype(dtype)  # not pyarrow's to_pandas_dtype(): older pyarrow imports pandas for it

    def tensors(arrays: list[np.ndarray]) -> pa.ChunkedArray:
        flat = [np.asarray(a, stored).reshape(-1) for a in arrays]
        return pa.chunked_array([pa.LargeListArray.from_arrays(pa.array([0, f.size], pa.int64()), pa.array(f)) for f in flat])

    return pa.table(
        {
            "run_id": pa.array([run_id] * n, pa.string()),
            "step": pa.array([step] * n, pa.int64()),
            "variable": pa.array(variables, pa.string()),
            "shape": pa.array([list(g.shape) for g in gradients], pa.list_(pa.int32())),
            "values": tensors(gradients),
            "l2_norm": pa.array(norms, pa.float32()),
            "reason": pa.array([reason] * n, pa.string()),
            "weights": tensors(weights) if weights is not None else pa.nulls(n, schema.field("weights").type),
        },
        schema=schema,
    )


class SnapshotPolicy:
    """Which steps are kept in full, and why: the first and last, every `every`-th,
    and anomalies: a non-finite value, or a global norm above `spike_factor` times
    the running median of the last `window` finite steps."""

    def __init__(self, every: int, last_step: int, spike_factor: float, window: int = 100):
        self.every, self.last_step, self.spike_factor = every, last_step, spike_factor
        self._norms: collections.deque = collections.deque(maxlen=window)

    def scheduled(self, step: int) -> bool:
        """Known before the step runs (so its weights can be read before the update)."""
        return step == 1 or step % self.every == 0 or step == self.last_step

    def reason(self, step: int, global_norm: float, finite: bool) -> str:
        """Comma-separated reasons to keep `step` in full; empty to keep only its statistics."""
        reasons = [
            name
            for name, applies in (
                ("first", step == 1),
                ("scheduled", step % self.every == 0),
                ("last", step == self.last_step),
                ("non-finite", not finite),
                ("norm-spike", finite and len(self._norms) >= 10 and global_norm > self.spike_factor * np.median(self._norms)),
            )
            if applies
        ]
        if finite:
            self._norms.append(global_norm)
        return ",".join(reasons)


class SnapshotWriter:
    """Writes gradient snapshots on a background thread, so training rarely waits on disk.

    The queue is bounded: if the disk falls behind, training blocks rather than
    holding an unbounded number of snapshots in memory.
    """

    def __init__(
        self, storage: Storage, directory: Path, run_id: str, variables: list[str], dtype: str = "float32", max_pending: int = 2
    ):
        self.storage, self.directory, self.run_id, self.variables, self.dtype = storage, directory, run_id, variables, dtype
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gradient-writer", daemon=True)
        self._thread.start()

    def write(
        self,
        step: int,
        epoch: int,
        reason: str,
        gradients: list[np.ndarray],
        norms: list[float],
        weights: list[np.ndarray] | None = None,
    ) -> None:
        """Queue one snapshot (see `snapshot_table` for the arguments)."""
        self._raise_if_failed()
        self._queue.put((step, epoch, reason, gradients, norms, weights))

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                step, epoch, reason, gradients, norms, weights = item
                try:
                    table = snapshot_table(self.run_id, step, reason, self.variables, gradients, norms, weights, self.dtype)
                    # off the training thread, and so is the upload to an object store
                    write_partition_file(self.storage, snapshot_file(self.directory, epoch, step), table, **PARQUET_OPTIONS)
                except BaseException as error:  # surfaced on the training thread
                    self._error = error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing gradient snapshots failed: {self._error}") from self._error


class StepLog:
    """Per-step rows and per-(step, variable) statistics, flushed to `steps/` and `stats/` together.

    Flushed at checkpoints and epoch ends (a file holds one epoch); a resumed run
    rewrites the same file names from the checkpoint on, so no step is ever missing
    or doubled.
    """

    def __init__(self, storage: Storage, run_dir: Path, variables: list[str]):
        self.storage, self.run_dir, self.variables = storage, run_dir, variables
        self._rows: list[tuple] = []

    def append(
        self, step: int, epoch: int, loss: float, global_norm: float, learning_rate: float, sample_ids: np.ndarray, stats: np.ndarray
    ) -> None:
        """`stats`: [variables, STAT_NAMES], as `gradient_stats` computed them."""
        if self._rows and self._rows[-1][1] != epoch:
            self.flush()
        self._rows.append((step, epoch, loss, global_norm, learning_rate, sample_ids, stats))

    def flush(self) -> None:
        if not self._rows:
            return
        steps, epochs, losses, global_norms, rates, sample_ids, stats = zip(*self._rows)
        stats = np.stack(stats)  # [steps, variables, stats]
        n = len(self.variables)
        step_table = pa.table(
            {
                "step": pa.array(steps, pa.int64()),
                "loss": pa.array(losses, pa.float32()),
                "global_norm": pa.array(global_norms, pa.float32()),
                "learning_rate": pa.array(rates, pa.float32()),
                "sample_ids": pa.array([ids.tolist() for ids in sample_ids], pa.list_(pa.int64())),
            },
            schema=file_schema(STEP_SCHEMA),
        )
        stat_columns = {}
        for i, name in enumerate(STAT_NAMES):
            values = stats[:, :, i].reshape(-1)
            stat_columns[name] = pa.array(values.astype(np.int64) if name.endswith("_count") else values, STATS_SCHEMA.field(name).type)
        stat_table = pa.table(
            {
                "step": pa.array(np.repeat(steps, n), pa.int64()),
                "variable": pa.array(self.variables * len(steps), pa.string()),
                **stat_columns,
            },
            schema=file_schema(STATS_SCHEMA),
        )
        for name, table in (("steps", step_table), ("stats", stat_table)):
            path = partition_file(self.run_dir / name, epochs[0], f"{name}-{steps[0]:09d}.parquet")
            write_partition_file(self.storage, path, table, compression="zstd")
        self._rows = []
