"""Reading a run's gradients back: Arrow tables, or numpy arrays in their original shape.

Only files listed in `gradients/_manifest.json` are read: the manifest is written
last, by `export_gradients`, so a reader never sees a half-written snapshot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.config import TapelineError
from tasks.gradients import MANIFEST
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
    return [directory / entry["path"] for entry in read_json(manifest)["files"]]


def read_gradients(
    run: str | Path, variables: list[str] | None = None, steps: list[int] | None = None, columns: list[str] | None = None
) -> pa.Table:
    """The snapshot rows of `run`, optionally only some variables, steps and columns.

    Ask for `columns=["step", "variable", "l2_norm"]` and the tensors are never read:
    Parquet reads only the columns it is asked for.
    """
    return pq.read_table(published_files(run), columns=columns, filters=_selection(variables, steps))


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


def read_stats(run: str | Path, variables: list[str] | None = None, steps: list[int] | None = None) -> pa.Table:
    """Per-(step, variable) statistics of every step (see tasks/gradients.py)."""
    return pq.read_table(run_directory(run) / "stats", filters=_selection(variables, steps))


def _selection(variables: list[str] | None, steps: list[int] | None):
    condition = None
    for name, wanted in (("variable", variables), ("step", steps)):
        if wanted is not None:
            clause = pc.field(name).isin(wanted)
            condition = clause if condition is None else condition & clause
    return condition
