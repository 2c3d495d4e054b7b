"""Stage 4, export_gradients: validate what training wrote, publish it, report it.

Training writes one Parquet file per snapshot step. This stage checks every
complete file against the schema and the model's variables, then writes
`gradients/_manifest.json` listing them: a reader that trusts the manifest never
sees a file that was still being written. It is safe to run twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task
from prefect.artifacts import create_table_artifact

from tasks.config import TapelineError
from tasks.gradients import GRADIENT_DTYPES, MANIFEST, gradient_schema
from tasks.storage import write_json
from tasks.train import TrainedModel



class GradientExportError(TapelineError):
    """Training left gradient files that do not match the schema or the model."""


@dataclass(frozen=True)
class GradientExport:
    uri: str
    manifest_uri: str
    steps: list[int]
    variables: list[dict]  # per variable: name, shape, last and mean L2 norm


def publish_gradients(trained: TrainedModel) -> GradientExport:
    directory = Path(trained.gradients_uri)
    files = sorted(directory.glob("step-*.parquet"))  # temporary files start with "." and do not match
    if not files:
        raise GradientExportError(f"{directory}: training wrote no gradient snapshots")
    tables = []
    for path in files:
        schema = pq.read_schema(path)
        if not any(schema.equals(gradient_schema(dtype)) for dtype in GRADIENT_DTYPES):
            raise GradientExportError(f"{path.name}: schema {schema} is not the gradient schema")
        table = pq.read_table(path, columns=["step", "variable", "shape", "l2_norm"])
        if table.column("variable").to_pylist() != trained.variables:
            raise GradientExportError(f"{path.name}: variables {table.column('variable').to_pylist()} != {trained.variables}")
        tables.append(table)
    stats = pa.concat_tables(tables)
    steps = sorted(set(stats.column("step").to_pylist()))
    summary = _summarise(stats, trained.variables)
    manifest = directory / MANIFEST
    write_json(
        manifest,
        {
            "run_id": trained.run_id,
            "files": [{"path": p.name, "rows": len(t), "bytes": p.stat().st_size} for p, t in zip(files, tables)],
            "steps": steps,
            "variables": summary,
        },
    )
    return GradientExport(uri=str(directory), manifest_uri=str(manifest), steps=steps, variables=summary)


def _summarise(stats: pa.Table, variables: list[str]) -> list[dict]:
    names = np.array(stats.column("variable").to_pylist())
    norms = stats.column("l2_norm").to_numpy()
    shapes = stats.column("shape").to_pylist()
    rows = []
    for name in variables:
        mine = np.flatnonzero(names == name)  # in step order: files were read sorted by step
        rows.append(
            {
                "variable": name,
                "shape": shapes[mine[0]],
                "last_l2_norm": float(norms[mine[-1]]),
                "mean_l2_norm": float(norms[mine].mean()),
                "max_l2_norm": float(norms[mine].max()),
            }
        )
    return rows


@task(name="export_gradients")
def export_gradients(trained: TrainedModel) -> GradientExport:
    """Publish the run's gradient snapshots and report per-variable shape and L2 norm."""
    exported = publish_gradients(trained)
    create_table_artifact(
        key="gradient-norms",
        table=exported.variables,
        description=f"Gradient L2 norms of run `{trained.run_id}` over {len(exported.steps)} snapshots "
        f"(last: step {exported.steps[-1]}). Data: `{exported.uri}`",
    )
    return exported
