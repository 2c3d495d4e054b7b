"""The gradient schema, and the writers that persist it during training.

Two Parquet datasets under a run:

`gradients/` — full snapshots, one row per (step, variable), one file per step:
    run_id string, epoch int32, step int64, variable string,
    shape list<int32>, values large_list<float32> (flattened in C order),
    l2_norm float32 (of `values`, so reports never need to read `values`).
The values are the gradients exactly as `tape.gradient` returned them, before
the optimizer applied them.

`steps/` — one row per training step, one file per stretch between checkpoints
(named by its first step):
    step int64, epoch int32, loss float32, sample_ids list<int64>
`sample_ids` are values of the training split's `sample_id` column.

Files appear under their final name only when complete (see tasks/storage.py).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.storage import atomic_path

GRADIENT_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("epoch", pa.int32()),
        ("step", pa.int64()),
        ("variable", pa.string()),
        ("shape", pa.list_(pa.int32())),
        ("values", pa.large_list(pa.float32())),
        ("l2_norm", pa.float32()),
    ]
)
STEP_SCHEMA = pa.schema(
    [("step", pa.int64()), ("epoch", pa.int32()), ("loss", pa.float32()), ("sample_ids", pa.list_(pa.int64()))]
)

# Dictionary encoding of floats is slow and grows the file; BYTE_STREAM_SPLIT
# groups the exponent bytes together so zstd can find their redundancy.
PARQUET_OPTIONS = dict(
    compression="zstd",
    use_dictionary=["run_id", "variable"],
    column_encoding={"values.list.element": "BYTE_STREAM_SPLIT"},
)


def snapshot_file(directory: Path, step: int) -> Path:
    return directory / f"step-{step:09d}.parquet"


def snapshot_table(run_id: str, epoch: int, step: int, variables: list[str], gradients: list[np.ndarray]) -> pa.Table:
    flat = [np.asarray(g, dtype=np.float32).reshape(-1) for g in gradients]
    offsets = np.cumsum([0] + [f.size for f in flat], dtype=np.int64)
    n = len(variables)
    return pa.table(
        {
            "run_id": pa.array([run_id] * n, pa.string()),
            "epoch": pa.array([epoch] * n, pa.int32()),
            "step": pa.array([step] * n, pa.int64()),
            "variable": pa.array(variables, pa.string()),
            "shape": pa.array([list(g.shape) for g in gradients], pa.list_(pa.int32())),
            "values": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.concatenate(flat))),
            # Accumulated in float64: a float32 sum over 2.7M squares drifts in the 5th digit.
            "l2_norm": pa.array([np.linalg.norm(f.astype(np.float64)) for f in flat], pa.float32()),
        },
        schema=GRADIENT_SCHEMA,
    )


class SnapshotWriter:
    """Writes gradient snapshots on a background thread, so training rarely waits on disk.

    The queue is bounded: if the disk falls behind, training blocks rather than
    holding an unbounded number of snapshots in memory.
    """

    def __init__(self, directory: Path, run_id: str, variables: list[str], max_pending: int = 2):
        self.directory, self.run_id, self.variables = directory, run_id, variables
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gradient-writer", daemon=True)
        self._thread.start()

    def write(self, step: int, epoch: int, gradients: list[np.ndarray]) -> None:
        self._raise_if_failed()
        self._queue.put((step, epoch, gradients))

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
                step, epoch, gradients = item
                try:
                    table = snapshot_table(self.run_id, epoch, step, self.variables, gradients)
                    with atomic_path(snapshot_file(self.directory, step)) as temporary:
                        pq.write_table(table, temporary, **PARQUET_OPTIONS)
                except BaseException as error:  # surfaced on the training thread
                    self._error = error

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing gradient snapshots failed: {self._error}") from self._error


def write_steps(directory: Path, epoch: int, steps: list[int], losses: list[float], sample_ids: list[np.ndarray]) -> Path:
    """Persist a stretch of the per-step table (a resumed run rewrites the same file name)."""
    table = pa.table(
        {
            "step": pa.array(steps, pa.int64()),
            "epoch": pa.array([epoch] * len(steps), pa.int32()),
            "loss": pa.array(losses, pa.float32()),
            "sample_ids": pa.array([ids.tolist() for ids in sample_ids], pa.list_(pa.int64())),
        },
        schema=STEP_SCHEMA,
    )
    path = directory / f"steps-{steps[0]:09d}.parquet"
    with atomic_path(path) as temporary:
        pq.write_table(table, temporary, compression="zstd")
    return path
