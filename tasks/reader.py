"""Reading a run's gradients back: Arrow tables, or numpy arrays in their original shape.

Only files listed in `gradients/_manifest.json` are read: the manifest is written
last, by `export_gradients`, so a reader never sees a half-written snapshot.
Every dataset is hive-partitioned by epoch (see tasks/gradients.py); tables come
back with the columns in schema order, `epoch` included.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from tasks.config import TapelineError
from tasks.gradients import GRADIENT_SCHEMA, MANIFEST, PARTITIONING, STATS_SCHEMA, STEP_SCHEMA
from tasks.storage import read_json


class NoGradientsError(TapelineError):
    """The run has no published gradient snapshots."""


def run_directory(run: str | Path) -> Path:
    """A run given as its directory or as its run.json."""
    path = Path(run)
    return path.parent if path.name == "run.json" else path


def published_files(run: str | Path) -> list[Path]:
    directory = run_directory(run) / "gradients"
    manifest = directory / MANIFEST
    if not manifest.exists():
        raise NoGradientsError(f"{run_directory(run)} has no published gradients (no {manifest.relative_to(directory.parent)})")
    return [directory / entry["path"] for entry in read_json(manifest)["files"]]  # epoch=<N>/step-<step>.parquet


def read_gradients(
    run: str | Path, variables: list[str] | None = None, steps: list[int] | None = None, columns: list[str] | None = None
) -> pa.Table:
    """The snapshot rows of `run`, optionally only some variables, steps and columns.

    Ask for `columns=["step", "variable", "l2_norm"]` and the tensors are never read:
    Parquet reads only the columns it is asked for.
    """
    directory = run_directory(run) / "gradients"
    return _read(published_files(run), directory, GRADIENT_SCHEMA, columns, _selection(variables, steps))


def gradient_arrays(run: str | Path, step: int, variables: list[str] | None = None, field: str = "values") -> dict[str, np.ndarray]:
    """{variable: tensor} of one snapshot step, in the variables' own shapes (`field="weights"` for the weights)."""
    table = read_gradients(run, variables, [step], ["variable", "shape", field])
    if table.num_rows == 0:
        raise NoGradientsError(f"{run_directory(run)} has no snapshot at step {step}")
    arrays = {}
    for variable, shape, values in zip(*(table.column(c).to_pylist() for c in ("variable", "shape", field))):
        if values is None:
            raise NoGradientsError(f"step {step} of {run_directory(run)} has no {field} for {variable}")
        arrays[variable] = np.asarray(values, np.float32).reshape(shape)
    return arrays


def read_stats(
    run: str | Path, variables: list[str] | None = None, steps: list[int] | None = None, columns: list[str] | None = None
) -> pa.Table:
    """Per-(step, variable) statistics of every step (see tasks/gradients.py)."""
    directory = run_directory(run) / "stats"
    return _read(directory, directory, STATS_SCHEMA, columns, _selection(variables, steps))


def read_steps(run: str | Path, steps: list[int] | None = None, columns: list[str] | None = None) -> pa.Table:
    """One row per training step: loss, global norm, learning rate, the batch's sample ids."""
    directory = run_directory(run) / "steps"
    return _read(directory, directory, STEP_SCHEMA, columns, _selection(None, steps))


def _read(source: Path | list[Path], directory: Path, schema: pa.Schema, columns: list[str] | None, condition) -> pa.Table:
    """`source` (the dataset `directory`, or files in it) read with the epoch taken from the `epoch=<N>` directories."""
    if not directory.is_dir():
        raise NoGradientsError(f"{directory.parent} has no {directory.name}/")
    dataset = ds.dataset(source, format="parquet", partitioning=PARTITIONING, partition_base_dir=str(directory))
    return dataset.to_table(columns=columns or schema.names, filter=condition)


def _selection(variables: list[str] | None, steps: list[int] | None):
    condition = None
    for name, wanted in (("variable", variables), ("step", steps)):
        if wanted is not None:
            clause = pc.field(name).isin(wanted)
            condition = clause if condition is None else condition & clause
    return condition
