"""Outside readers of a run's data, as a user runs them on what run.json names: pyarrow, DuckDB and Polars."""

import duckdb
import polars as pl
import pyarrow.dataset as ds

PARTITIONED = ("gradients", "steps", "stats")  # hive-partitioned by epoch


def dataset_paths(run: dict) -> dict[str, str]:
    """Every Parquet dataset run.json names: the run's dataset directories, the preprocessed
    splits' directory and each split file."""
    uris = run["uris"]
    return {name: uris[name] for name in (*PARTITIONED, "train", "validation", "test")} | {"preprocessed": run["dataset"]["preprocessed"]}


def read_by_every_reader(path: str) -> dict[str, tuple[int, list[str]]]:
    """{reader: (rows, columns)} of `path`, a dataset directory or a Parquet file, each read the natural way.

    Rows come from the files' footers, so a torn or foreign file anywhere the reader looks fails the read.
    """
    pattern = path if path.endswith(".parquet") else f"{path}/**/*.parquet"
    arrow = ds.dataset(path, partitioning="hive")
    query = duckdb.sql(f"SELECT * FROM read_parquet('{pattern}', hive_partitioning = true)")
    scan = pl.scan_parquet(path)
    return {
        "pyarrow": (arrow.count_rows(), arrow.schema.names),
        "duckdb": (query.aggregate("count(*)").fetchall()[0][0], query.columns),
        "polars": (scan.select(pl.len()).collect().item(), scan.collect_schema().names()),
    }


def assert_every_reader_agrees(path: str, rows: int | None = None) -> int:
    """Every reader reads `path` with the same rows (`rows`, if given) and, for a run's datasets, the `epoch` column."""
    results = read_by_every_reader(path)
    counts = {reader: count for reader, (count, _) in results.items()}
    assert len(set(counts.values())) == 1 and rows in (None, counts["pyarrow"]), (path, counts, rows)
    if path.rstrip("/").endswith(PARTITIONED):
        assert all("epoch" in columns for _, columns in results.values()), (path, results)
    return counts["pyarrow"]
