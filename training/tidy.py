"""The tidy defect table (docs/architecture.md "Tidy defect table"): schema, writer, loader.

A table is a directory of Parquet part files and the manifest that lists them (:data:`MANIFEST`);
readers read only the listed parts, so a load is switched to at once, when its manifest replaces
the previous one.
"""

from __future__ import annotations

import glob
import json
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from fnmatch import fnmatch
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from motlens.atomic import atomic_write
from training.outdir import exclusive, refuse_foreign, written

#: JSON ``{"format", "rows", "parts": [{"file", "rows", "bytes"}]}``; the leading ``_`` keeps Parquet
#: dataset readers (pyarrow.dataset, Spark) from taking it for data, and its suffix (not ``.json``)
#: keeps ``motlens data load`` of a directory holding a table from taking it for API JSON.
MANIFEST = "_tidy.manifest"
#: JSON list of every file a load wrote into the table, written before it moves its parts in and removed
#: once it has removed the previous parts: the next load removes what a killed one left, nothing else
PENDING = "_tidy.pending"
FORMAT = "motlens-tidy/2"
#: formats still read: /1 tables have no ``split_group`` column (read as missing: their rows carry no
#: row group, so their texts are split by split key alone, docs/training.md "Split")
READ_FORMATS = frozenset({"motlens-tidy/1", FORMAT})

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
        ("split_group", pa.string()),  # the defect a row records (training.dvsa_lookups.defect_groups); null: none
    ]
)
TIDY_COLUMNS: tuple[str, ...] = tuple(TIDY_SCHEMA.names)


class TidyError(ValueError):
    """A tidy table directory that is not one complete load; the message says why."""


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
    """Write tidy chunks as Parquet part files under ``out_dir``, listed in its manifest; returns rows.

    The parts are written into a staging directory beside ``out_dir``, moved in under names of this
    load's own (``part-<load>-NNNNN.parquet``) and switched to by atomically replacing the manifest
    (:data:`MANIFEST`); only then are the previous load's parts removed. Readers read the parts the
    manifest lists, so a load that fails or is killed at any point leaves the previous table as it
    was (never a partial one that looks complete), and one that reads no rows raises
    :class:`TidyError` and changes nothing. One load at a time per ``out_dir``
    (:class:`training.outdir.OutputBusy` otherwise); the next one removes what a killed one left.
    A non-empty ``out_dir`` that is not a tidy table (no :data:`MANIFEST`) is refused before anything
    is read (:class:`training.outdir.ForeignOutput`), and a load removes only files loads wrote.
    """
    out_dir = Path(out_dir)
    refuse_foreign(out_dir, (MANIFEST, PENDING), "a motlens tidy table")
    with exclusive(out_dir, f".{glob.escape(out_dir.name)}.loading-*", out_dir.parent):
        staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.loading-", dir=out_dir.parent))
        try:
            parts = _write_parts(chunks, staging, rows_per_file)
            if not parts:  # a load that read nothing never replaces a table with an empty one
                raise TidyError(f"no rows were read from the inputs; {out_dir} is left as it was")
            new = {part["file"] for part in parts}
            old = _written(out_dir) - new  # the previous load's parts, and any a killed load moved in
            atomic_write(out_dir / PENDING, json.dumps(sorted(old | new)))
            for part in parts:
                (staging / part["file"]).replace(out_dir / part["file"])  # same filesystem: a rename
            total = sum(part["rows"] for part in parts)
            atomic_write(out_dir / MANIFEST, json.dumps({"format": FORMAT, "rows": total, "parts": parts}, indent=1))
            for name in old:
                (out_dir / name).unlink(missing_ok=True)
            (out_dir / PENDING).unlink()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return total


def _written(out_dir: Path) -> set[str]:
    """The parts earlier loads wrote into ``out_dir``: those its manifest lists and those a killed
    load's :data:`PENDING` names (a manifest that cannot be read lists none: its parts are left)."""
    try:
        listed = {Path(str(part["file"])).name for part in json.loads((out_dir / MANIFEST).read_text())["parts"]}
    except (OSError, ValueError, KeyError, TypeError):
        listed = set()
    return {name for name in listed | written(out_dir / PENDING) if fnmatch(name, "part-*.parquet")}


def _write_parts(chunks: Iterable[pd.DataFrame], staging: Path, rows_per_file: int) -> list[dict]:
    """The chunks as part files in ``staging``; their manifest entries (``file``, ``rows``, ``bytes``)."""
    load = secrets.token_hex(4)
    parts: list[dict] = []
    writer: pq.ParquetWriter | None = None
    try:
        for df in chunks:
            if df.empty:
                continue
            if writer is None or parts[-1]["rows"] >= rows_per_file:
                if writer is not None:
                    writer.close()
                parts.append({"file": f"part-{load}-{len(parts):05d}.parquet", "rows": 0})
                writer = pq.ParquetWriter(staging / parts[-1]["file"], TIDY_SCHEMA, compression="zstd")
            writer.write_table(to_table(df))
            parts[-1]["rows"] += len(df)
    finally:
        if writer is not None:
            writer.close()
    for part in parts:
        part["bytes"] = (staging / part["file"]).stat().st_size
    return parts


def tidy_files(path: Path) -> list[Path]:
    """The Parquet files of a tidy table: ``path`` itself when it is a file, else the parts its
    manifest lists, each checked to be there with the listed size and row count.

    Raises :class:`TidyError` for a directory without a readable manifest (an interrupted load, or
    one written before tables had manifests) or with a part missing or different.
    """
    path = Path(path)
    if not path.is_dir():
        return [path]
    manifest = path / MANIFEST
    try:
        doc = json.loads(manifest.read_text())
        if doc["format"] not in READ_FORMATS:
            raise ValueError(f"format {doc['format']!r}, not {FORMAT!r}")
        parts = [(Path(str(p["file"])).name, int(p["rows"]), int(p["bytes"])) for p in doc["parts"]]
    except FileNotFoundError:
        raise TidyError(
            f"{path}: no manifest {MANIFEST}, so not a complete tidy table (an interrupted load, or one "
            "written before tables had manifests); load it again with `motlens data load`"
        ) from None
    except PermissionError as e:
        raise TidyError(f"{manifest}: cannot read the manifest ({e.strerror}): check the file's permissions") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TidyError(f"{manifest}: unreadable manifest ({e}); load the table again") from e
    return [_checked(path, *part) for part in parts]


def _checked(directory: Path, name: str, rows: int, size: int) -> Path:
    """``directory/name``, once its size and (footer) row count are as listed."""
    f = directory / name
    try:
        ok = f.stat().st_size == size and pq.read_metadata(f).num_rows == rows
    except FileNotFoundError:
        raise TidyError(
            f"{directory}: part {name} is missing (damaged, or replaced by a load while read); load it again"
        ) from None
    except (OSError, pa.ArrowException):
        ok = False
    if not ok:
        raise TidyError(f"{directory}: part {name} does not match the manifest ({rows} rows, {size} bytes)")
    return f


def load_tidy(path: Path) -> pd.DataFrame:
    """A tidy table (a directory, see :func:`tidy_files`, or one part file) as one DataFrame
    (``section`` int8, dates as ``date``)."""
    tables = [pq.read_table(f, schema=TIDY_SCHEMA) for f in tidy_files(path)]
    return (pa.concat_tables(tables) if tables else TIDY_SCHEMA.empty_table()).to_pandas(types_mapper=None)
