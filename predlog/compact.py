"""Compaction of embedded Parquet segments: one file per closed hour, then one per closed day.

What is merged (a segment's group comes from its name, which starts with its first row's time):

* a day that ended ``settle`` (10 min) ago: all its files, hour files included, into
  ``<day>T000000-c<hash of the file names>.parquet``;
* before that, each hour of it that ended ``settle`` ago: into ``<day>T<hour>0000-c<hash>.parquet``.

A late segment of a merged hour or day (a spool replay) makes a group of two: the next run merges
it in. Crash-safe and exactly-once:

1. the group's segments are merged, in name order and ``CHUNK_ROWS`` rows at a time (bounded
   memory, whatever the size of the day), into a hidden ``.<merged name>.parquet.tmp`` (fsync'd);
   the segments stay in the readers' sight meanwhile;
2. they are renamed into ``predictions/.compact-<group>/`` and
3. the merged file is renamed into place, both under :func:`predlog.swaplock.swapping` (an exclusive
   lock that every embedded read, and the writer's check-and-write, holds shared), so no read lists
   the folder half-way: its rows are never missed or doubled, and no listed file is gone when opened;
4. the folder is renamed to ``.compacted-<group>`` (one atomic step) and removed.

A rerun after a crash finishes the job: a merged temporary file is deleted (its segments are
still in place or in their folder), a folder without its merged file is merged again, a folder
whose merged file exists is only removed, and so is a ``.compacted-*`` folder (a crash while
deleting merged segments one by one must not leave some of them to be merged again). A merge that
fails (disk full, an unreadable segment) changes nothing, or puts the segments back where they
were, removes its partial output and raises :class:`CompactError`, so a failure never hides a
group. Nothing of an hour that has not ended is touched, so the live writer's files stay put.

:func:`expire` deletes the ``predictions`` days past the TTL (``MOTLENS_PREDLOG_TTL_DAYS``), as the
server table's ``TTL toDateTime(ts) + INTERVAL ttl_days DAY`` drops its daily partitions; the audit
tables keep everything, as on the server. A day's files go into ``predictions/.expired-<day>/`` under
the swap lock (a read sees the whole day or none of it), which is then removed; the next run removes
what a stopped run left there, and the rest of its day.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from predlog.schema import arrow_schema
from predlog.sinks import TOKENS_KEY, _publish, batch_tokens
from predlog.swaplock import swapping

#: how long after an hour (or day) ends its files are merged: the writer's last batch of it is written by then
SETTLE = timedelta(minutes=10)
#: rows read before they are written out as one row group of the merged file (what a merge holds in memory)
CHUNK_ROWS = 65_536
#: a segment's name: ``<day>T<HHMMSS>-…`` (a batch, a merged file) or ``<day>T<HHMMSS><microseconds>-…``
#: (an audit row: ``drift_reports``, ``promotion_events``); its day and hour group it
_GROUPED = re.compile(r"^(\d{8})T(\d{2})\d{4}(?:\d{6})?-")
#: what a merge killed before its rename leaves (a batch's temporary file has no ``c`` before its token)
_MERGED_TMP = re.compile(r"^\.\d{8}T\d{6}-c[0-9a-f]{32}\.parquet\.tmp$")
#: the tables whose rows expire after ``ttl_days``: those with a TTL in predlog/migrations (001)
EXPIRING = frozenset({"predictions"})


class CompactError(RuntimeError):
    """A group could not be merged; the message says whether its segments are back in place."""


class CompactBusy(CompactError):
    """Another compaction holds the folder (nothing was done to it): a skip, not a failure."""


@dataclass(frozen=True)
class Expired:
    """A day (``YYYYMMDD``) that :func:`expire` deleted: how many files, how many bytes."""

    day: str
    files: int
    bytes: int


def _merged_name(key: str, files: list[Path]) -> str:
    digest = hashlib.sha256("\n".join(sorted(f.name for f in files)).encode()).hexdigest()[:32]
    day, _, hour = key.partition("T")
    return f"{day}T{hour or '00'}0000-c{digest}"


def _write_merged(folder: Path, files: list[Path], name: str) -> tuple[Path, int]:
    """Stream ``files`` (in name order: by first row) into ``folder/.<name>.parquet.tmp``, fsync it;
    returns (that file, rows).

    The batches' tokens go with their rows (schema metadata): a replay of one of them must still find it
    stored. Rows are not re-sorted: readers order by ``ts`` in SQL, and name order is nearly time order."""
    schema = arrow_schema(folder.name)
    tokens = sorted(set().union(*(batch_tokens(f) for f in files)))
    tmp = folder / f".{name}.parquet.tmp"
    rows = 0
    try:
        with pq.ParquetWriter(
            tmp, schema.with_metadata({TOKENS_KEY: "\n".join(tokens)}), compression="zstd", compression_level=3
        ) as out:
            held: list[pa.RecordBatch] = []
            count = 0
            for f in sorted(files, key=lambda p: p.name):
                for batch in ds.dataset(f, schema=schema, format="parquet").to_batches(batch_size=CHUNK_ROWS):
                    held.append(batch)
                    count += batch.num_rows
                    if count >= CHUNK_ROWS:
                        out.write_table(pa.Table.from_batches(held, schema=schema))
                        rows, held, count = rows + count, [], 0
            if held:
                out.write_table(pa.Table.from_batches(held, schema=schema))
                rows += count
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)  # a partial file must not stay behind (disk full)
        raise
    return tmp, rows


def _finish(folder: Path, key: str, work: Path) -> int:
    """Merge what an interrupted run left in ``work`` (out of sight) unless its merged file exists."""
    files = sorted(work.glob("*.parquet"))
    name = _merged_name(key, files)
    rows = 0
    if files and not (folder / f"{name}.parquet").exists():
        tmp, rows = _write_merged(folder, files, name)
        _publish(tmp, folder / f"{name}.parquet")
    _retire(folder, key, work)
    return rows


def _retire(folder: Path, key: str, work: Path) -> None:
    spent = folder / f".compacted-{key}"
    work.rename(spent)
    shutil.rmtree(spent, ignore_errors=True)  # its rows are in the merged file; what is left goes next run


def compact(
    folder: Path, now: datetime | None = None, min_files: int = 2, settle: timedelta = SETTLE
) -> dict[str, int]:
    """Merge each closed hour's (``<day>T<hour>``) and closed day's (``<day>``) segments in ``folder``
    (e.g. ``…/predlog/predictions``); returns rows per group merged.

    One run per folder at a time (:class:`CompactBusy` if another holds it): two runs could
    otherwise put back a group's segments that the other is publishing merged."""
    with _exclusive(folder):
        return _compact(folder, now or datetime.now(UTC), min_files, settle)


def expire(folder: Path, ttl_days: int, now: datetime | None = None) -> list[Expired]:
    """Delete the days of ``folder`` whose every row is ``ttl_days`` old (day D once D + 1 + ``ttl_days``
    days have passed, as the server table's TTL drops D's partition), oldest first; nothing for a table
    without a TTL (:data:`EXPIRING`). A file that an older build wrote across midnight holds rows of the
    next day: its day waits until they have expired too. Holds the folder as :func:`compact` does
    (:class:`CompactBusy`); :class:`CompactError` if a day cannot be set aside (the next run retries)."""
    if folder.name not in EXPIRING:
        return []
    with _exclusive(folder):
        return _expire(folder, (now or datetime.now(UTC)) - timedelta(days=ttl_days))


def _expire(folder: Path, cutoff: datetime) -> list[Expired]:
    """Delete the days whose rows all lie at or before ``cutoff``."""
    for spent in folder.glob(".expired-*"):  # a run stopped while deleting: its day is out of sight already
        shutil.rmtree(spent)
    days: dict[str, list[Path]] = {}
    for f, key, day, _ in _stamped(folder):
        if day + timedelta(days=1) <= cutoff:
            days.setdefault(key, []).append(f)
    gone = []
    for key, files in sorted(days.items()):
        if any((newest := _newest(f)) is not None and newest > cutoff for f in files):
            continue
        spent = folder / f".expired-{key}"
        size = sum(f.stat().st_size for f in files)
        try:
            with swapping(folder.parent):
                spent.mkdir(exist_ok=True)
                for f in files:
                    f.rename(spent / f.name)
        except OSError as e:
            raise CompactError(f"{folder.name}: deleting the expired day {key} failed ({e}); run it again") from e
        shutil.rmtree(spent)
        gone.append(Expired(key, len(files), size))
    return gone


def _newest(f: Path) -> datetime | None:
    """The newest ``ts`` in segment ``f``; None when it has none, or cannot be read (its name alone counts)."""
    try:
        newest = pc.max(pq.read_table(f, columns=["ts"])["ts"]).as_py()
    except (OSError, pa.ArrowException):
        return None
    return newest if isinstance(newest, datetime) else None


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
            raise CompactBusy(
                f"{folder}: held by another compaction (another `motlens log compact`, or a running predictor's "
                "automatic compaction); left to it"
            ) from None
        yield
    finally:
        os.close(fd)


def _stamped(folder: Path) -> Iterator[tuple[Path, str, datetime, int]]:
    """Each segment with the day (``YYYYMMDD``, and its start) and hour its name gives."""
    for f in folder.glob("*.parquet"):
        m = _GROUPED.match(f.name)
        try:
            day = datetime.strptime(m.group(1), "%Y%m%d").replace(tzinfo=UTC) if m else None
        except ValueError:  # 00000000: an empty batch
            day = None
        if m is not None and day is not None:
            yield f, m.group(1), day, int(m.group(2))


def _groups(folder: Path, now: datetime, settle: timedelta) -> dict[str, list[Path]]:
    """Segments by the closed day or closed hour they belong to (by name); those of open hours are left."""
    groups: dict[str, list[Path]] = {}
    for f, key, day, hour in _stamped(folder):
        if day + timedelta(days=1) + settle <= now:
            groups.setdefault(key, []).append(f)
        elif day + timedelta(hours=hour + 1) + settle <= now:
            groups.setdefault(f"{key}T{hour:02d}", []).append(f)
    return groups


def _compact(folder: Path, now: datetime, min_files: int, settle: timedelta) -> dict[str, int]:
    done: dict[str, int] = {}
    for spent in folder.glob(".compacted-*"):  # segments of a finished merge, being deleted when it stopped
        shutil.rmtree(spent)
    for tmp in folder.iterdir():  # a merge killed before its rename: its segments are in place or in a work folder
        if _MERGED_TMP.match(tmp.name):
            tmp.unlink()
    for work in sorted(folder.glob(".compact-*")):  # finish an interrupted run first
        key = work.name.removeprefix(".compact-")
        done[key] = _merge(folder, key, work)
    for key, files in sorted(_groups(folder, now, settle).items()):
        if len(files) >= min_files:
            done[key] = _merge_in_place(folder, key, sorted(files))
    return done


def _merge_in_place(folder: Path, key: str, files: list[Path]) -> int:
    """Merge while the segments stay in sight; then swap them for the merged file (a few renames)."""
    name = _merged_name(key, files)
    try:
        tmp, rows = _write_merged(folder, files, name)
    except Exception as e:
        raise CompactError(f"{_what(folder, key, e)}; nothing was changed") from e
    work = folder / f".compact-{key}"
    try:
        with swapping(folder.parent):
            work.mkdir(exist_ok=True)
            for f in files:
                f.rename(work / f.name)
            os.replace(tmp, folder / f"{name}.parquet")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _failed(folder, key, work, e) from e
    _retire(folder, key, work)
    return rows


def _merge(folder: Path, key: str, work: Path) -> int:
    try:
        return _finish(folder, key, work)
    except Exception as e:
        raise _failed(folder, key, work, e) from e


def _what(folder: Path, key: str, e: Exception) -> str:
    return f"{folder.name}: compacting {key} failed ({str(e).splitlines()[0] if str(e) else type(e).__name__})"


def _failed(folder: Path, key: str, work: Path, e: Exception) -> CompactError:
    """Put the group's segments back in sight unless their merged file exists (that holds the rows)."""
    what = _what(folder, key, e)
    merged = folder / f"{_merged_name(key, sorted(work.glob('*.parquet')))}.parquet"
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
