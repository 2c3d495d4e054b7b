"""The writers that persist gradients during training: full snapshots, and the per-step log.

The gradients, steps, stats and samples datasets, their schemas and hive layout: docs/data-format.md#gradients-steps-and-stats.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from tapeline.errors import TapelineError
from tapeline.gradients.schema import (
    SAMPLE_SCHEMA,
    STAT_NAMES,
    STATS_SCHEMA,
    STEP_COLUMNS,
    Examples,
    file_schema,
    gradient_schema,
    step_schema,
)
from tapeline.storage.layout import RunPaths
from tapeline.storage.root import Storage, atomic_path


def partition_file(directory: Path, epoch: int, name: str) -> Path:
    return directory / f"epoch={epoch}" / name


def atomic_partition_path(path: Path):
    """`atomic_path` for a `partition_file` of a dataset: staged beside the dataset's directory, in
    `path.parents[2]`, so a reader of the directory (Polars takes hidden files too) never meets it."""
    return atomic_path(path, staging=path.parents[2])


def write_partition_file(storage: Storage, path: Path, table: pa.Table, **options) -> None:
    """Write `table` to `path`, a `partition_file` of a dataset, whole or not at all, and publish it."""
    storage.write_table(path, table, dataset=path.parents[1], **options)


# Dictionary encoding of floats is slow and grows the file; BYTE_STREAM_SPLIT
# groups the exponent bytes together so zstd can find their redundancy. Min/max
# statistics only for the columns a reader filters on: on the tensors they would
# cost a pass over every value (docs/performance.md#export-cost) and serve no query.
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
    column, zero-copy. (Cast to float16 on the device: numpy's cast is slow, docs/performance.md.)
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


class SnapshotWriter:
    """Writes gradient snapshots on a background thread, so training rarely waits on disk.

    The queue is bounded: if the disk falls behind, training blocks rather than
    holding an unbounded number of snapshots in memory.
    """

    def __init__(self, storage: Storage, directory: Path, run_id: str, variables: list[str], dtype: str = "float32", max_pending: int = 2):
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
        if isinstance(self._error, TapelineError):  # the user can act on it (a full disk): its one line as it is
            raise self._error
        if self._error is not None:
            raise RuntimeError(f"writing gradient snapshots failed: {self._error}") from self._error


class LoggedStep(NamedTuple):
    """One step as the log keeps it until a flush writes it."""

    row: dict  # its `steps/` columns by name (schema.STEP_COLUMNS)
    stats: np.ndarray  # [variables, STAT_NAMES]
    examples: Examples | None


class StepLog:
    """Per-step rows, per-(step, variable) statistics and per-(step, example) rows, flushed to `steps/`, `stats/`
    and `samples/` together, on a background thread.

    Flushed at checkpoints and epoch ends (a file holds one epoch); a resumed run
    rewrites the same file names from the checkpoint on, so no step is ever missing
    or doubled. At most one flush is being written while rows gather for the next;
    `flush` returns it, so a checkpoint can wait for the rows before it (loop.py).
    """

    def __init__(self, storage: Storage, run: RunPaths, variables: list[str]):
        self.storage, self.run, self.variables = storage, run, variables
        self._rows: list[LoggedStep] = []
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="step-log-writer")
        self._pending: Future | None = None

    def append(
        self, step: int, epoch: int, values: Mapping[str, float], sample_ids: np.ndarray, stats: np.ndarray, examples: Examples | None = None
    ) -> None:  # fmt: skip
        """`values`: the step's other `steps/` columns by name (one it lacks is stored as NaN); `stats`: [variables,
        STAT_NAMES], as `gradient_stats` computed them; `examples`: see recorder.record."""
        if unknown := set(values) - STEP_COLUMNS.keys():
            raise ValueError(f"step values not in the steps schema (schema.STEP_COLUMNS): {', '.join(sorted(unknown))}")
        if self._rows and self._rows[-1].row["epoch"] != epoch:
            self.flush()
        self._rows.append(LoggedStep({**values, "step": step, "epoch": epoch, "sample_ids": sample_ids}, stats, examples))

    def flush(self) -> Future | None:
        """Hand the gathered rows to the writer; the write, done when its files are published (None: nothing pending)."""
        if self._rows:
            self.wait()  # bounded: the previous flush is written before the next is handed over
            rows, self._rows = self._rows, []
            self._pending = self._writer.submit(self._write, rows)
        return self._pending

    def wait(self) -> None:
        """Until the flush being written, if any, is published (raises what it raised)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        self.wait()
        self._writer.shutdown()

    def _write(self, logged: list[LoggedStep]) -> None:
        rows = [step.row for step in logged]
        steps, sample_ids = [row["step"] for row in rows], [row["sample_ids"] for row in rows]
        tables = {"steps": _step_table(rows)}
        tables["stats"] = _stats_table(steps, self.variables, np.stack([step.stats for step in logged]))
        if logged[0].examples is not None:
            tables["samples"] = _samples_table(steps, sample_ids, [step.examples for step in logged])
        for name, table in tables.items():
            path = partition_file(self.run.dataset(name), rows[0]["epoch"], f"{name}-{steps[0]:09d}.parquet")
            write_partition_file(self.storage, path, table, compression="zstd")


def _step_table(rows: list[dict]) -> pa.Table:
    """The rows' `steps/` columns, each in its type (schema.STEP_COLUMNS); a value a row lacks is NaN."""
    schema = file_schema(step_schema())
    return pa.table({field.name: pa.array([row.get(field.name, math.nan) for row in rows], field.type) for field in schema}, schema=schema)


def _stats_table(steps, variables: list[str], stats: np.ndarray) -> pa.Table:
    """`stats`: [steps, variables, STAT_NAMES]."""
    columns = {"step": pa.array(np.repeat(steps, len(variables)), pa.int64()), "variable": pa.array(variables * len(steps), pa.string())}
    for i, name in enumerate(STAT_NAMES):
        values = stats[:, :, i].reshape(-1)
        columns[name] = pa.array(values.astype(np.int64) if name.endswith("_count") else values, STATS_SCHEMA.field(name).type)
    return pa.table(columns, schema=file_schema(STATS_SCHEMA))


def _samples_table(steps, sample_ids, examples: list[Examples]) -> pa.Table:
    """One row per example of each step; the norms are the square roots of what the device summed."""
    rows = Examples.concatenate(examples)
    squared = rows.squared_norms.astype(np.float64)
    layer_norms = np.sqrt(squared).astype(np.float32)
    return pa.table(
        {
            "step": pa.array(np.repeat(steps, [len(ids) for ids in sample_ids]), pa.int64()),
            "sample_id": pa.array(np.concatenate(sample_ids), pa.int64()),
            **{name: pa.array(values, SAMPLE_SCHEMA.field(name).type) for name, values in rows.columns.items()},
            "grad_norm": pa.array(np.sqrt(squared.sum(axis=1)).astype(np.float32), pa.float32()),
            "layer_norms": pa.FixedSizeListArray.from_arrays(layer_norms.reshape(-1), squared.shape[1]).cast(pa.list_(pa.float32())),
        },
        schema=file_schema(SAMPLE_SCHEMA),
    )
