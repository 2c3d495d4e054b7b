"""Stage 4, export_gradients: validate what training wrote, publish it, report it.

Training writes one Parquet file per snapshot step, `epoch=<N>/step-<step>.parquet`.
This stage checks every complete file against the schema (no `epoch` column in a
file: its directory holds it) and the model's variables, then writes
`gradients.manifest.json` beside `gradients/`, listing them: a reader that trusts
the manifest never sees a file that was still being written. It is safe to run twice.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tapeline.errors import TapelineError
from tapeline.gradients.noise_report import noise_scale_median_last_epoch
from tapeline.gradients.plotting import DISTINCT, palette_png, pyplot, save_png
from tapeline.gradients.schema import GRADIENT_DTYPES, file_schema, gradient_schema
from tapeline.reader import read_stats
from tapeline.results import GradientExport, TrainedModel
from tapeline.storage.root import Storage


class GradientExportError(TapelineError):
    """Training left gradient files that do not match the schema or the model."""


def publish_gradients(storage: Storage, trained: TrainedModel) -> GradientExport:
    """Check every complete snapshot file where training published it, then publish the manifest that lists them."""
    run = storage.layout.run(trained.run_id)
    filesystem, base = storage.arrow(run.gradients)
    listing = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    # Sorted by file name, i.e. by step: as text, epoch=10 would come before epoch=2.
    # (Temporary files are never in here: see tapeline/storage/root.py.)
    files = sorted((info for info in listing if info.base_name.startswith("step-")), key=lambda info: info.base_name)
    if not files:
        raise GradientExportError(f"{trained.gradients_uri}: training wrote no gradient snapshots")
    tables, entries = [], []
    for info in files:
        name = info.path.removeprefix(base + "/")
        if not re.fullmatch(r"epoch=\d+/step-\d+\.parquet", name):
            raise GradientExportError(f"{name}: not in an epoch=<N> directory of {trained.gradients_uri}")
        schema = pq.read_schema(info.path, filesystem=filesystem)
        if not any(schema.equals(file_schema(gradient_schema(dtype))) for dtype in GRADIENT_DTYPES):
            raise GradientExportError(f"{name}: schema {schema} is not the gradient schema (less `epoch`, which is the directory's)")
        table = pq.read_table(info.path, filesystem=filesystem, columns=["step", "variable", "shape", "l2_norm", "reason"])
        if table.column("variable").to_pylist() != trained.variables:
            raise GradientExportError(f"{name}: variables {table.column('variable').to_pylist()} != {trained.variables}")
        tables.append(table)
        entries.append({"path": name, "rows": len(table), "bytes": info.size})
    stats = pa.concat_tables(tables)
    steps = sorted(set(stats.column("step").to_pylist()))
    summary = _summarise(stats, trained.variables)
    reasons = dict(zip(stats.column("step").to_pylist(), stats.column("reason").to_pylist()))
    anomalies = [{"step": step, "reason": reason} for step, reason in sorted(reasons.items()) if "non-finite" in reason or "norm-spike" in reason]
    storage.write_json(
        run.gradients_manifest,
        {
            "run_id": trained.run_id,
            "files": entries,
            "steps": steps,
            "variables": summary,
            "anomalies": anomalies,
        },
    )
    return GradientExport(
        uri=trained.gradients_uri, manifest_uri=storage.uri_of(run.gradients_manifest), steps=steps, variables=summary, anomalies=anomalies,
        noise_scale_smoothed_median_last_epoch=noise_scale_median_last_epoch(storage.uri_of(run.directory)),
    )  # fmt: skip


def plot_norms(storage: Storage, run_id: str) -> bytes:
    """`render_norms` of the run's stats, saved under the run."""
    run = storage.layout.run(run_id)
    stats = read_stats(storage.uri_of(run.directory), columns=["step", "variable", "l2_norm"])
    png = render_norms(
        stats.column("step").to_numpy(), np.array(stats.column("variable").to_pylist()), stats.column("l2_norm").to_numpy(),
        title=f"Gradient norms, run {run_id}",
    )  # fmt: skip
    save_png(storage, run.norm_plot, png)
    return png


def render_norms(steps: np.ndarray, variables: np.ndarray, norms: np.ndarray, title: str = "Gradient norms") -> bytes:
    """A PNG of each variable's gradient L2 norm at every step (a row per step and variable, as the stats have them).

    Each variable in a colour of its own (DISTINCT: no two alike), the key below the
    plot, off the data, a layer per column: its kernel above its bias.
    """
    figure, axes = pyplot().subplots(figsize=(8, 4.8), dpi=100, layout="constrained")
    names = list(dict.fromkeys(variables))  # the model's order: each variable's first row
    for index, variable in enumerate(names):
        mine = variables == variable
        axes.plot(steps[mine], norms[mine], label=variable, linewidth=0.8, color=DISTINCT[index % len(DISTINCT)])
    axes.set(xlabel="step", ylabel="gradient L2 norm", yscale="log", title=title)
    axes.grid(True, which="major", linewidth=0.4, alpha=0.5)
    figure.legend(loc="outside lower center", ncols=max(1, len(names) // 2), fontsize=8, frameon=False)
    return palette_png(figure)


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
