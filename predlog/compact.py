"""Compaction of embedded Parquet segments: one file per closed day instead of one per batch.

Crash-safe and exactly-once without coordination with readers or the writer:

1. the day's segments are renamed into ``predictions/.compact-<day>/`` (readers glob only the
   top level, so the rows are briefly invisible, never doubled);
2. they are merged into ``<day>T000000-c<hash of the file names>.parquet`` (tmp + fsync + rename);
3. the folder is removed.

A rerun after a crash finishes the job: a folder without its merged file is merged again, a
folder whose merged file exists is only removed. Only days before yesterday (UTC) are touched,
so the live writer's files are never moved.
"""

from __future__ import annotations

import hashlib
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from predlog.schema import arrow_schema
from predlog.sinks import TOKENS_KEY, batch_tokens, write_parquet_segment


def _merged_name(day: str, files: list[Path]) -> str:
    digest = hashlib.sha256("\n".join(sorted(f.name for f in files)).encode()).hexdigest()[:32]
    return f"{day}T000000-c{digest}"


def _finish(folder: Path, day: str, work: Path) -> int:
    files = sorted(work.glob("*.parquet"))
    name = _merged_name(day, files)
    rows = 0
    if files and not (folder / f"{name}.parquet").exists():
        table = pa.concat_tables(pq.read_table(f, schema=arrow_schema(folder.name)) for f in files)
        rows = table.num_rows
        tokens = sorted(set().union(*(batch_tokens(f) for f in files)))
        # the batches' tokens go with their rows: a replay of one of them must still find it stored
        merged = table.sort_by("ts").replace_schema_metadata({TOKENS_KEY: "\n".join(tokens)})
        write_parquet_segment(folder, merged, name)
    shutil.rmtree(work)
    return rows


def compact(folder: Path, now: datetime | None = None, min_files: int = 2) -> dict[str, int]:
    """Merge each closed day's segments in ``folder`` (e.g. ``…/predlog/predictions``); returns rows per day."""
    cutoff = ((now or datetime.now(UTC)) - timedelta(days=1)).strftime("%Y%m%d")
    done: dict[str, int] = {}
    for work in sorted(folder.glob(".compact-*")):  # finish an interrupted run first
        day = work.name.removeprefix(".compact-")
        done[day] = _finish(folder, day, work)
    by_day: dict[str, list[Path]] = {}
    for f in folder.glob("*.parquet"):
        day = f.name[:8]
        if day.isdigit() and day < cutoff:
            by_day.setdefault(day, []).append(f)
    for day, files in sorted(by_day.items()):
        if len(files) < min_files:
            continue
        work = folder / f".compact-{day}"
        work.mkdir(exist_ok=True)
        for f in files:
            f.rename(work / f.name)
        done[day] = _finish(folder, day, work)
    return done
