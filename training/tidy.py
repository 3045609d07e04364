"""The tidy defect table (docs/architecture.md "Tidy defect table"): schema, writer, loader."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

TIDY_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("section", pa.int8()),
        ("severity", pa.string()),
        ("make", pa.string()),
        ("model", pa.string()),
        ("fuel_type", pa.string()),
        ("vehicle_age_years", pa.float32()),
        ("odometer_miles", pa.float32()),
        ("test_date", pa.date32()),
        ("test_id", pa.int64()),
        ("source", pa.string()),
    ]
)
TIDY_COLUMNS: tuple[str, ...] = tuple(TIDY_SCHEMA.names)


def to_table(df: pd.DataFrame) -> pa.Table:
    """A tidy DataFrame as an Arrow table with exactly ``TIDY_SCHEMA`` (missing columns → null)."""
    arrays = []
    for field in TIDY_SCHEMA:
        if field.name in df.columns:
            col = df[field.name]
            if field.type == pa.date32():
                days = pd.to_datetime(col, errors="coerce").to_numpy().astype("datetime64[D]")
                arrays.append(pa.array(days, type=field.type, from_pandas=True))
            else:
                arrays.append(pa.array(col, type=field.type, from_pandas=True))
        else:
            arrays.append(pa.nulls(len(df), type=field.type))
    return pa.Table.from_arrays(arrays, schema=TIDY_SCHEMA)


def write_tidy(chunks: Iterable[pd.DataFrame], out_dir: Path, rows_per_file: int = 1_000_000) -> int:
    """Write tidy chunks as Parquet part files ``part-NNNNN.parquet`` under ``out_dir``; returns rows.

    The parts are written into a staging directory beside ``out_dir`` and replace its old parts only
    once every chunk is written: a rerun never mixes two loads, and a load that fails part-way leaves
    the previous table as it was (never a partial one that looks complete).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.loading-", dir=out_dir.parent))
    total = 0
    part = 0
    writer: pq.ParquetWriter | None = None
    in_file = 0
    try:
        try:
            for df in chunks:
                if df.empty:
                    continue
                if writer is None or in_file >= rows_per_file:
                    if writer is not None:
                        writer.close()
                    path = staging / f"part-{part:05d}.parquet"
                    writer = pq.ParquetWriter(path, TIDY_SCHEMA, compression="zstd")
                    part += 1
                    in_file = 0
                writer.write_table(to_table(df))
                in_file += len(df)
                total += len(df)
        finally:
            if writer is not None:
                writer.close()
        for old in out_dir.glob("part-*.parquet"):
            old.unlink()
        for new in sorted(staging.glob("part-*.parquet")):
            new.replace(out_dir / new.name)  # same filesystem: a rename
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return total


def load_tidy(directory: Path) -> pd.DataFrame:
    """All tidy part files under ``directory`` as one DataFrame (``section`` int8, dates as ``date``)."""
    directory = Path(directory)
    files = sorted(directory.glob("*.parquet")) if directory.is_dir() else [directory]
    if not files:
        raise FileNotFoundError(f"no tidy Parquet files in {directory}")
    tables = [pq.read_table(f, schema=TIDY_SCHEMA) for f in files]
    return pa.concat_tables(tables).to_pandas(types_mapper=None)
