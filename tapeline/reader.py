"""Reading a run's gradients back: Arrow tables, or numpy arrays in their original shape.

Only gradient files listed in `gradients.manifest.json` (beside `gradients/`) are
read: the manifest is written last, by `export_gradients`, so a reader never sees a
snapshot that was not checked.
Every dataset is hive-partitioned by epoch (docs/data-format.md); tables come
back with the columns in schema order, `epoch` included. A run is named by its
directory or run.json, on local disk or in an object store (`s3://bucket/…/runs/<id>`,
credentials from the environment): the files are read where they are, at the places
tapeline/storage/layout.py names.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from tapeline.errors import CorruptFileError, TapelineError
from tapeline.gradients.schema import (
    GRADIENT_SCHEMA,
    PARTITIONING,
    SAMPLE_SCHEMA,
    STATS_SCHEMA,
    step_schema,
)
from tapeline.storage.layout import MODEL_CARD, RUN_JSON, locate_run, run_location


class NoGradientsError(TapelineError):
    """The run has no published gradient snapshots."""


class NoRunError(NoGradientsError):
    """There is no run at the place given, or by the id given (so no gradients either)."""


class NotInRunError(TapelineError):
    """The run exists but has nothing for what was asked: an epoch, a label, a step it does not have."""


def find_run(run: str, storage: str) -> str:
    """The run's directory or URI, once it is there. `run` is a run id, looked up under the storage root `storage`,
    when it is one path segment (a run id never has a '/'); else the run's directory, its run.json or its
    `s3://…/runs/<id>`."""
    if "/" in run or run in (".", "..", RUN_JSON):
        _require_run(run)
        return run
    found = run_location(storage, run)
    if not _is_run(found):
        here = f" (for the directory {run} here, write ./{run})" if Path(run).is_dir() else ""
        raise NoRunError(f"no run {run} under {storage}{here}")
    return found


def read_run_json(run: str | Path, name: str | None = None) -> dict:
    """The run's run.json, or the JSON file `name` (a path relative to the run's directory)."""
    filesystem, paths = locate_run(run)
    return _read_json(filesystem, paths.run_json if name is None else paths.directory / name, run)


def published_files(run: str | Path) -> list[str]:
    """The complete snapshot files, as the manifest lists them: epoch=<N>/step-<step>.parquet under gradients/."""
    filesystem, paths = locate_run(run)
    try:
        manifest = _read_json(filesystem, paths.gradients_manifest, run)
    except NoGradientsError:
        raise NoGradientsError(f"{run} has no published gradients (no {paths.gradients_manifest.name})") from None
    return [f"{paths.gradients}/{entry['path']}" for entry in manifest["files"]]


def open_dataset(run: str | Path, name: str) -> ds.Dataset:
    """One of the run's Parquet datasets, `gradients` (only its published files), `stats`, `steps` or `samples`, as an
    Arrow dataset: what DuckDB and Polars can query in place, in a bucket too."""
    _require_run(run)
    filesystem, paths = locate_run(run)
    base = str(paths.dataset(name))
    source = published_files(run) if name == "gradients" else base
    if filesystem.get_file_info(base).type != pafs.FileType.Directory:
        raise NoGradientsError(f"{run} has no {name}/")
    schema = {"gradients": GRADIENT_SCHEMA, "stats": STATS_SCHEMA, "steps": step_schema(), "samples": SAMPLE_SCHEMA}[name]
    # Temporary files are never inside a dataset directory (tapeline/storage/root.py); pyarrow would skip them anyway.
    return ds.dataset(source, schema=schema, format="parquet", filesystem=filesystem, partitioning=PARTITIONING, partition_base_dir=base)


def read_gradients(run: str | Path, variables: list[str] | None = None, steps: list[int] | None = None, columns: list[str] | None = None) -> pa.Table:
    """The snapshot rows of `run`, optionally only some variables, steps and columns.

    Ask for `columns=["step", "variable", "l2_norm"]` and the tensors are never read:
    Parquet reads only the columns it is asked for.
    """
    return _read(open_dataset(run, "gradients"), columns, _selection(variables, steps))


def gradient_arrays(run: str | Path, step: int, variables: list[str] | None = None, field: str = "values") -> dict[str, np.ndarray]:
    """{variable: tensor} of one snapshot step, in the variables' own shapes (`field="weights"` for the weights)."""
    table = read_gradients(run, variables, [step], ["variable", "shape", field])
    if table.num_rows == 0:
        raise NoGradientsError(f"{run} has no snapshot at step {step}")
    arrays = {}
    for variable, shape, values in zip(*(table.column(c).to_pylist() for c in ("variable", "shape", field))):
        if values is None:
            raise NoGradientsError(f"step {step} of {run} has no {field} for {variable}")
        arrays[variable] = np.asarray(values, np.float32).reshape(shape)
    return arrays


def read_stats(run: str | Path, variables: list[str] | None = None, steps: list[int] | None = None, columns: list[str] | None = None) -> pa.Table:
    """Per-(step, variable) statistics of every step (docs/data-format.md)."""
    return _read(open_dataset(run, "stats"), columns, _selection(variables, steps))


def read_steps(run: str | Path, steps: list[int] | None = None, columns: list[str] | None = None) -> pa.Table:
    """One row per training step: loss, global norm, learning rate, the batch's sample ids."""
    return _read(open_dataset(run, "steps"), columns, _selection(None, steps))


def read_samples(run: str | Path, epochs: list[int] | None = None, columns: list[str] | None = None) -> pa.Table:
    """One row per (step, example): each example's own loss, prediction and gradient norms (docs/data-format.md)."""
    return _read(_samples_dataset(run), columns, None if epochs is None else pc.field("epoch").isin(epochs))


def _samples_dataset(run: str | Path) -> ds.Dataset:
    """The run's samples dataset; NoGradientsError naming the likely reason when it has none."""
    try:
        return open_dataset(run, "samples")
    except NoRunError:
        raise
    except NoGradientsError as error:
        raise NoGradientsError(f"{error} (a run trained with --no-per-example-norms has none)") from None


RANKING_COLUMNS = ("sample_id", "label", "mean_grad_norm", "mean_loss", "seen", "latest_step", "latest_predicted", "latest_correct")


def rank_samples(run: str | Path, epoch: int | None = None, top: int | None = None, label: int | None = None) -> pa.Table:
    """The training examples of one epoch (default: the last), highest mean gradient norm first (then mean loss).

    Per example: its label, its mean per-example gradient norm and loss over the
    steps it was in, how many those were (`seen`), and at the latest of them
    (`latest_step`) the class the model predicted (`latest_predicted`: the argmax of
    its logits at that step, before the step's update; null in files written before
    the samples had a `predicted` column) and whether that was right
    (`latest_correct`). `label` keeps one class.
    NotInRunError when the run has no such epoch, or no example of that label in it.
    """
    epoch = _epoch_of(run, epoch)
    columns = ["step", "sample_id", "label", "predicted", "loss", "correct", "grad_norm"]
    table = read_samples(run, [epoch], columns).sort_by("step")
    if label is not None:
        labels = pc.unique(table.column("label")).to_pylist()
        if label not in labels:
            raise NotInRunError(f"run {_run_id(run)} has no example of label {label} in epoch {epoch}; its labels there are {spans(labels)}")
        table = table.filter(pc.field("label") == label)
    ids, inverse = np.unique(table.column("sample_id").to_numpy(), return_inverse=True)
    seen = np.bincount(inverse, minlength=len(ids))
    latest = np.zeros(len(ids), np.int64)
    np.maximum.at(latest, inverse, np.arange(table.num_rows))  # the row of each example's latest step
    mean = {name: np.bincount(inverse, table.column(name).to_numpy().astype(np.float64), len(ids)) / seen for name in ("grad_norm", "loss")}
    order = np.lexsort((-mean["loss"], -mean["grad_norm"]))[:top]
    latest = latest[order]
    return pa.table(
        [
            pa.array(ids[order], pa.int64()),
            table.column("label").take(latest),
            pa.array(mean["grad_norm"][order]),
            pa.array(mean["loss"][order]),
            pa.array(seen[order], pa.int64()),
            *(table.column(name).take(latest) for name in ("step", "predicted", "correct")),
        ],
        names=list(RANKING_COLUMNS),
    )


def spans(values: list[int], most: int = 12) -> str:
    """Whole numbers as runs, for a message: [0, 1, 2, 5] -> "0–2, 5"; of more than `most` runs the first and last few."""
    runs = []
    for value in sorted(set(values)):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    text = [str(a) if a == b else f"{a}–{b}" for a, b in runs]
    return ", ".join(text if len(text) <= most else [*text[: most // 2], "…", *text[-most // 2 + 1 :]])


def class_names(run: str | Path) -> list[str]:
    """The run's class names in label order: its model card's, else the labels as numbers (a run still training)."""
    try:
        return read_run_json(run, MODEL_CARD)["classes"]
    except NoGradientsError:
        return [str(label) for label in range(256)]


def last_epoch(run: str | Path) -> int:
    """The last epoch the run's samples dataset has rows of."""
    return _epoch_of(run, None)


def _epoch_of(run: str | Path, epoch: int | None) -> int:
    """`epoch`, or the run's last; NotInRunError when the run has no such epoch."""
    dataset = _samples_dataset(run)
    epochs = sorted({ds.get_partition_keys(f.partition_expression)["epoch"] for f in dataset.get_fragments()})  # no rows read
    if not epochs:
        raise NoGradientsError(f"{run} has no per-example rows yet")
    if epoch is not None and epoch not in epochs:
        raise NotInRunError(f"run {_run_id(run)} has no epoch {epoch}; its epochs are {spans(epochs)}")
    return epochs[-1] if epoch is None else epoch


def _run_id(run: str | Path) -> str:
    return locate_run(run)[1].run_id


def _require_run(run: str | Path) -> None:
    if not _is_run(run):
        raise NoRunError(f"no run at {run}")


def _is_run(run: str | Path) -> bool:
    """Whether the run's directory is there (a run still training has no run.json yet)."""
    filesystem, paths = locate_run(run)
    return filesystem.get_file_info(str(paths.directory)).type == pafs.FileType.Directory


def _read_json(filesystem: pafs.FileSystem, path: PurePath, run: str | Path) -> dict:
    try:
        with filesystem.open_input_stream(str(path)) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        raise NoGradientsError(f"{run} has no {path.name}") from None
    except ValueError as error:  # not JSON, not UTF-8
        raise CorruptFileError(f"{path}: cannot read it, the file is truncated or corrupt ({error})") from None


def _read(dataset: ds.Dataset, columns: list[str] | None, condition) -> pa.Table:
    columns = columns or dataset.schema.names
    try:
        return dataset.to_table(columns=columns, filter=condition)
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError):  # pyarrow's errors name the file only sometimes
        _raise_for_unreadable_file(dataset, columns, condition)
        raise  # no file fails on its own


def _raise_for_unreadable_file(dataset: ds.Dataset, columns: list[str], condition) -> None:
    """Read the dataset's files one at a time, as `_read` read them together: CorruptFileError names the first that fails."""
    for fragment in dataset.get_fragments(filter=condition):
        try:
            fragment.to_table(schema=dataset.schema, columns=columns, filter=condition)
        except (pa.ArrowInvalid, OSError) as error:
            fragment.filesystem.get_file_info(fragment.path)  # raises too when a store is out of reach: not the file's fault
            reason = " ".join(str(error).split()).removeprefix(f"Could not open Parquet input source '{fragment.path}': ")
            raise CorruptFileError(f"{fragment.path}: cannot read it, the file is truncated or corrupt ({reason})") from None


def _selection(variables: list[str] | None, steps: list[int] | None):
    condition = None
    for name, wanted in (("variable", variables), ("step", steps)):
        if wanted is not None:
            clause = pc.field(name).isin(wanted)
            condition = clause if condition is None else condition & clause
    return condition
