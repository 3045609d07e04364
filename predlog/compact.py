"""Compaction of embedded Parquet segments: one file per closed day instead of one per batch.

Crash-safe and exactly-once without coordination with readers or the writer:

1. the day's segments are renamed into ``predictions/.compact-<day>/`` (readers glob only the
   top level, so the rows are briefly invisible, never doubled);
2. they are merged into ``<day>T000000-c<hash of the file names>.parquet`` (tmp + fsync + rename);
3. the folder is renamed to ``.compacted-<day>`` (one atomic step) and removed.

A rerun after a crash finishes the job: a folder without its merged file is merged again, a
folder whose merged file exists is only removed, and so is a ``.compacted-*`` folder (a crash
while deleting merged segments one by one must not leave some of them to be merged again). A
merge that fails (disk full, an unreadable segment) puts the segments back where they were,
removes its partial output and raises :class:`CompactError`, so a failure never hides a day.
Only days before yesterday (UTC) are touched, so the live writer's files are never moved.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from predlog.schema import arrow_schema
from predlog.sinks import TOKENS_KEY, batch_tokens, write_parquet_segment


class CompactError(RuntimeError):
    """A day could not be merged; the message says whether its segments are back in place."""


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
    spent = folder / f".compacted-{day}"
    work.rename(spent)
    shutil.rmtree(spent, ignore_errors=True)  # its rows are in the merged file; what is left goes next run
    return rows


def compact(folder: Path, now: datetime | None = None, min_files: int = 2) -> dict[str, int]:
    """Merge each closed day's segments in ``folder`` (e.g. ``…/predlog/predictions``); returns rows per day.

    One run per folder at a time (:class:`CompactError` if another holds it): two runs could
    otherwise put back a day's segments that the other is publishing merged."""
    with _exclusive(folder):
        return _compact(folder, now, min_files)


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """An exclusive lock on the folder itself (flock on its descriptor: no lock file among the
    segments; released with the process), once the folder can be listed."""
    try:
        with os.scandir(folder):
            pass
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise CompactError(f"cannot compact {folder}: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CompactError(f"{folder}: another `motlens log compact` is running on it") from None
        yield
    finally:
        os.close(fd)


def _compact(folder: Path, now: datetime | None, min_files: int) -> dict[str, int]:
    cutoff = ((now or datetime.now(UTC)) - timedelta(days=1)).strftime("%Y%m%d")
    done: dict[str, int] = {}
    for spent in folder.glob(".compacted-*"):  # segments of a finished merge, being deleted when it stopped
        shutil.rmtree(spent)
    for work in sorted(folder.glob(".compact-*")):  # finish an interrupted run first
        day = work.name.removeprefix(".compact-")
        done[day] = _merge(folder, day, work)
    by_day: dict[str, list[Path]] = {}
    for f in folder.glob("*.parquet"):
        day = f.name[:8]
        if day.isdigit() and day < cutoff:
            by_day.setdefault(day, []).append(f)
    for day, files in sorted(by_day.items()):
        if len(files) < min_files:
            continue
        work = folder / f".compact-{day}"
        try:
            work.mkdir(exist_ok=True)
            for f in files:
                f.rename(work / f.name)
        except OSError as e:
            raise _failed(folder, day, work, e) from e
        done[day] = _merge(folder, day, work)
    return done


def _merge(folder: Path, day: str, work: Path) -> int:
    try:
        return _finish(folder, day, work)
    except Exception as e:
        raise _failed(folder, day, work, e) from e


def _failed(folder: Path, day: str, work: Path, e: Exception) -> CompactError:
    """Put the day's segments back in sight unless their merged file exists (that holds the rows)."""
    what = f"{folder.name}: compacting {day} failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
    merged = folder / f"{_merged_name(day, sorted(work.glob('*.parquet')))}.parquet"
    if merged.exists():
        return CompactError(f"{what}; its rows are in {merged.name}, run it again to remove {work.name}/")
    try:
        (folder / f".{merged.name}.tmp").unlink(missing_ok=True)  # left by an earlier, killed run
        if work.is_dir():
            for f in work.glob("*.parquet"):
                f.rename(folder / f.name)
            work.rmdir()
    except OSError as again:
        return CompactError(f"{what}; some of its segments are still in {work} ({again}): run it again")
    return CompactError(f"{what}; nothing was changed")
