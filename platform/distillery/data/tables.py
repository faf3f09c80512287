"""Writing and counting Ray Datasets: the prepare stage's and the task modules' shared helpers."""
from __future__ import annotations

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from .. import storage


def write_single(table: pa.Table, path: str) -> None:
    """One Parquet file, written through a temporary name: whole or absent."""
    fs, p = storage.resolve(path)
    storage.makedirs(storage.parent(path))
    pq.write_table(table, p + ".tmp", filesystem=fs)
    fs.move(p + ".tmp", p)


def write_dir(ds: ray.data.Dataset | None, path: str, schema: pa.Schema) -> None:
    """Sharded Parquet; an empty split still gets one empty file so readers find the schema."""
    if ds is not None:
        ds.write_parquet(path)
    if not storage.exists(path) or not storage.list_files(path, (".parquet",)):
        write_single(schema.empty_table(), storage.join(path, "part-empty.parquet"))


def write_frame(df: pd.DataFrame, path: str, schema: pa.Schema) -> None:
    """A small pandas table (the driver's) as a Parquet folder, `write_dir`'s empty file when it has no row."""
    write_dir(ray.data.from_arrow(pa.Table.from_pandas(df, schema=schema, preserve_index=False)) if len(df) else None,
              path, schema)


def count_rows(ds: ray.data.Dataset, keys: list[str]) -> pd.DataFrame:
    """Row counts per key: counted per block in parallel, summed on the driver.

    The results are small (one row per item / user / class), so this beats a hash-shuffle groupby.
    """
    def per_block(df: pd.DataFrame) -> pd.DataFrame:
        return df.groupby(keys, dropna=False).size().reset_index(name="count")
    parts = ds.select_columns(keys).map_batches(per_block, batch_format="pandas")
    df = parts.to_pandas()
    if df.empty:
        return pd.DataFrame(columns=keys + ["count"])
    return df.groupby(keys, dropna=False)["count"].sum().reset_index()
