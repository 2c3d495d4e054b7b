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

from typing import Any, NamedTuple

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
STEP_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.int32()),
        ("loss", pa.float32()),
        ("global_norm", pa.float32()),
        ("learning_rate", pa.float32()),
        ("sample_ids", pa.list_(pa.int64())),
        ("grad_variance", pa.float32()),
        ("grad_signal", pa.float32()),
        ("grad_noise_scale", pa.float32()),
    ]
)
NOISE_COLUMNS = ("grad_variance", "grad_signal", "grad_noise_scale")  # the estimates, in the order noise.noise_estimates returns them
SAMPLE_SCHEMA = pa.schema(
    [
        ("step", pa.int64()),
        ("epoch", pa.int32()),
        ("sample_id", pa.int64()),
        ("label", pa.uint8()),
        ("loss", pa.float32()),
        ("correct", pa.bool_()),
        ("grad_norm", pa.float32()),
        ("layer_norms", pa.list_(pa.float32())),
    ]
)


class Examples(NamedTuple):
    """One step's (or call's) per-example results, one row per example: device tensors, or their numpy copies."""

    loss: Any  # [B] float32, the example's own loss
    correct: Any  # [B] bool, the prediction at this step
    label: Any  # [B] int32
    squared_norms: Any  # [B, variables] float32, ‖gᵢ‖² per trainable variable, in the model's order

    @classmethod
    def from_rows(cls, rows: np.ndarray) -> Examples:
        """numpy columns from the step's packed rows [B, 3 + variables] (per_example.packed)."""
        return cls(rows[:, 0], rows[:, 1] > 0.5, rows[:, 2].astype(np.int32), rows[:, 3:])

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
