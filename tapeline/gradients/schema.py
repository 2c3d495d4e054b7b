"""The gradient datasets' schemas, partitioning, and the columns of a step's statistics.

Four Parquet datasets under a run (where: tapeline/storage/layout.py): `gradients/`, full
snapshots, one row per (step, variable), one file per step; `steps/`, one row per training
step; `stats/`, one row per (step, variable); `samples/`, one row per (step, example), only
with per-example norms on. Each is hive-partitioned by epoch: a file lives in
`<dataset>/epoch=<N>/` and does not hold the `epoch` column, the directory name supplies it
(declared int32 by PARTITIONING). The schemas below are the datasets' as read; `file_schema`
is what a file holds. docs/data-format.md describes every column.

Files appear under their final name only when complete (see tapeline/storage/root.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds

GRADIENT_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}  # the stored gradients' dtypes: --gradient-dtype's legal values
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


@dataclass(frozen=True)
class StepColumn:
    """A column of `steps/`: its stored type and, if TensorBoard shows it, its scalar's tag (training/summaries.py)."""

    type: pa.DataType
    tag: str | None = None
    description: str | None = None  # TensorBoard shows it beside the chart
    finite_only: bool = False  # TensorBoard leaves out a step whose value is not finite


RAW_NOISE = (
    "Raw: B_simple = tr Σ / |G|² of this step alone, as estimated. Each estimate is a difference, so the ratio is "
    "often ≤ 0 or huge; a NaN step is not written. The smoothed one is step/noise_scale_smoothed."
)
# The columns of `steps/` in stored order, by name; every per-step value travels under its name here, from the step
# that computes it (training/calls.STEP_VALUES on the device, noise.noise_estimates on the host) through the recorder
# to the writer and TensorBoard. A value a step did not compute is stored as NaN (the noise estimates without
# per-example norms). A new per-step number is an entry here and one where it is computed.
STEP_COLUMNS = {
    "step": StepColumn(pa.int64()),
    "epoch": StepColumn(pa.int32()),
    "loss": StepColumn(pa.float32(), "step/loss"),
    "global_norm": StepColumn(pa.float32(), "step/grad_norm"),
    "learning_rate": StepColumn(pa.float32()),
    "sample_ids": StepColumn(pa.list_(pa.int64())),
    "grad_variance": StepColumn(pa.float32()),
    "grad_signal": StepColumn(pa.float32()),
    "grad_noise_scale": StepColumn(pa.float32(), "step/noise_scale_raw", RAW_NOISE, finite_only=True),
}


def step_schema() -> pa.Schema:
    """The `steps/` dataset's schema, from STEP_COLUMNS as they are now."""
    return pa.schema([(name, column.type) for name, column in STEP_COLUMNS.items()])


# One number per example, computed in the compiled step (per_example.example_columns), in the order the step packs
# them (per_example.packed), with the numpy type each is stored as. A new per-example column is a line here, one in
# example_columns, and its row in docs/data-format.md.
EXAMPLE_COLUMNS = {
    "label": np.uint16,  # any number of classes up to 65,536 (the splits' label is uint8 up to 256)
    "predicted": np.uint16,  # the argmax of the example's logits at that step, before the update
    "loss": np.float32,  # the example's own loss at that step
    "correct": np.bool_,  # predicted == label
    "margin": np.float32,  # the label's logit minus the largest other logit at that step (< 0: another class wins)
    "p_label": np.float32,  # the softmax probability of the label at that step
}
SAMPLE_SCHEMA = pa.schema(
    [("step", pa.int64()), ("epoch", pa.int32()), ("sample_id", pa.int64())]
    + [(name, pa.from_numpy_dtype(dtype)) for name, dtype in EXAMPLE_COLUMNS.items()]
    + [("grad_norm", pa.float32()), ("layer_norms", pa.list_(pa.float32()))]
)


@dataclass(frozen=True)
class Examples:
    """One step's (or call's) per-example results on the host, one row per example."""

    columns: dict[str, np.ndarray]  # EXAMPLE_COLUMNS by name, each [B]
    squared_norms: np.ndarray  # [B, variables] float32, ‖gᵢ‖² per trainable variable, in the model's order

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> Examples:
        """From the step's packed rows [B, len(EXAMPLE_COLUMNS) + variables] (per_example.packed)."""
        columns = {name: rows[:, i].astype(dtype) for i, (name, dtype) in enumerate(EXAMPLE_COLUMNS.items())}
        return cls(columns, rows[:, len(EXAMPLE_COLUMNS) :])

    def split(self, sizes: list[int]) -> list[Examples]:
        """A call's rows, concatenated over its steps, cut back into each step's (`sizes`: the steps' batch sizes)."""
        bounds = np.cumsum(sizes)[:-1]
        columns = {name: np.split(values, bounds) for name, values in self.columns.items()}
        return [Examples({name: parts[i] for name, parts in columns.items()}, norms) for i, norms in enumerate(np.split(self.squared_norms, bounds))]

    @staticmethod
    def concatenate(examples: list[Examples]) -> Examples:
        return Examples(
            {name: np.concatenate([e.columns[name] for e in examples]) for name in EXAMPLE_COLUMNS},
            np.concatenate([e.squared_norms for e in examples]),
        )


STAT_NAMES = ("l2_norm", "mean", "std", "max_abs", "zero_fraction", "nan_count", "inf_count")
STATS_SCHEMA = pa.schema(
    [("step", pa.int64()), ("epoch", pa.int32()), ("variable", pa.string())]
    + [(name, pa.int64() if name.endswith("_count") else pa.float32()) for name in STAT_NAMES]
)

# One step's statistics as `gradient_stats` returns them, before they are written: an array [variables, STAT_NAMES].
L2_NORM = STAT_NAMES.index("l2_norm")
NON_FINITE_COUNTS = slice(STAT_NAMES.index("nan_count"), STAT_NAMES.index("inf_count") + 1)


def global_norm(stats: np.ndarray) -> float:
    """The L2 norm of the step's whole gradient, from the variables' norms (summed in float64)."""
    return float(np.sqrt(np.sum(np.square(stats[:, L2_NORM], dtype=np.float64))))


def non_finite_variables(stats: np.ndarray, variables: list[str]) -> list[str]:
    """The variables whose gradient holds a NaN or an Inf."""
    return [name for name, counts in zip(variables, stats[:, NON_FINITE_COUNTS]) if counts.any()]


def file_schema(schema: pa.Schema) -> pa.Schema:
    """What a file of the dataset holds: its schema without the partition column."""
    return schema.remove(schema.get_field_index("epoch"))
