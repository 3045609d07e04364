"""Reader for the DVSA anonymised MOT bulk files → tidy defect table chunks (``read_bulk``, ``BulkReader``).

Memory stays bounded: ``test_result`` and ``test_item`` are streamed in blocks and hash-partitioned
by ``test_id`` into Arrow files in a temporary directory (``tmp_dir``, default ``$TMPDIR``); each
partition is then joined with the (small) lookups and labelled (``training.mot_labels``). Partitions
are 32 MiB of input, up to 512 of them (16 GiB of input); beyond that a partition holding more than
1.5 × 32 MiB of input is split again by ``test_id`` into sub-partitions of ≈ 32 MiB before its join,
so memory is set by the partition size at any input size (docs/data.md "Bounded memory"). The
2 × 512 open partition files need an open-file limit above 1024: the soft limit is raised towards
the hard one, else :class:`BulkResourceError`. A read first removes the temporary directories of
reads whose process is gone (:func:`sweep_stale`).
"""

from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
from tqdm import tqdm

from training import mot_labels
from training.dvsa_columns import typed_items, typed_results
from training.dvsa_files import Source, check_damage, discover, iter_raw
from training.dvsa_lookups import Lookups, defect_groups, label_defects, load_lookups, with_detail
from training.dvsa_report import BulkFormatError, BulkReport, BulkResourceError, FileReport
from training.tidy import TIDY_COLUMNS

_REQUIRED_KINDS = ("test_result", "test_item", "item_detail")
#: Open files stay bounded (2 per partition); beyond 16 GiB of input, partitions hold more than
#: ``bucket_bytes`` of input and are split again before their join (:meth:`BulkReader._split`).
_MAX_PARTITIONS = 512
#: A partition is split when it holds more than this many ``bucket_bytes`` of input, into
#: sub-partitions of ``bucket_bytes`` but never under ``_MIN_SUB_BYTES`` of input.
_SPLIT_ABOVE = 1.5
_MIN_SUB_BYTES = 1 << 20
#: How much of a partition a split reads before writing it out to the sub-partitions.
_SPLIT_READ_BYTES = 16 << 20
#: Open files beyond the partition files: the inputs, Python, Arrow, the tidy writer, the caller's own.
_SPARE_FILES = 64
SOURCE_NAME = "dvsa_bulk"
#: The temporary partition directories: ``motlens-bulk-*`` in ``tmp_dir``, each holding :data:`OWNER_FILE`.
TMP_PREFIX = "motlens-bulk-"
#: ``<pid> <host>`` of the process reading into the directory: a later read removes the directory of
#: one that is gone (killed outright: SIGKILL, a crash), never that of one still running.
OWNER_FILE = "motlens-owner"

log = logging.getLogger(__name__)


def sweep_stale(root: Path) -> list[Path]:
    """Remove the partition directories in ``root`` whose reader (:data:`OWNER_FILE`) is gone: one on
    this host whose process no longer exists. Directories without that file, of another host or of a
    live process (any user's) are left alone; so is everything on a system without POSIX signals."""
    if os.name != "posix":  # os.kill(pid, 0) probes a process only there
        return []
    host = socket.gethostname()
    gone = []
    for d in root.glob(TMP_PREFIX + "*"):
        try:
            pid_text, _, owner_host = (d / OWNER_FILE).read_text().strip().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):  # not a directory, not (yet) marked, or not ours
            continue
        if pid <= 0 or owner_host != host or _alive(pid):
            continue
        shutil.rmtree(d, ignore_errors=True)
        log.info("removed %s, the temporary partition files of process %d, which is gone", d, pid)
        gone.append(d)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


def ensure_open_files(needed: int) -> None:
    """Raise the soft ``RLIMIT_NOFILE`` to ``needed`` (up to the hard limit) when it is lower;
    :class:`BulkResourceError` naming the limit needed when the hard limit is lower still."""
    try:
        import resource
    except ImportError:  # Windows: no such limit to raise (the C runtime's own is 8192 handles)
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    if hard == resource.RLIM_INFINITY or hard >= needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
            return
        except (ValueError, OSError):  # e.g. macOS caps the soft limit at OPEN_MAX below an unlimited hard one
            pass
    raise BulkResourceError(
        f"reading these bulk files needs up to {needed} open files at once, but this process may open only {soft} "
        f"(hard limit {hard}): raise it first, e.g. `ulimit -n {needed}` in the shell that runs motlens "
        "(a hard limit can be raised only by root: /etc/security/limits.conf, or LimitNOFILE= for a "
        "systemd service), or load into ClickHouse (`motlens data load --clickhouse`)"
    )


#: A defect row is a duplicate when all of these repeat (as the ClickHouse path's ReplacingMergeTree key).
_ITEM_KEY = ["test_id", "rfr_id", "rfr_type_code", "location_id", "dangerous_mark", "rfr_comment"]

_RESULT_SCHEMA = pa.schema(
    [
        ("test_id", pa.int64()),
        ("test_date", pa.timestamp("ns")),
        ("test_class_id", pa.int16()),
        ("test_mileage", pa.float64()),
        ("make", pa.string()),
        ("model", pa.string()),
        ("fuel_type", pa.string()),
        ("first_use_date", pa.timestamp("ns")),
    ]
)
_ITEM_SCHEMA = pa.schema(
    [
        ("test_id", pa.int64()),
        ("seq", pa.int64()),
        ("rfr_id", pa.int64()),
        ("rfr_type_code", pa.string()),
        ("location_id", pa.int64()),
        ("dangerous_mark", pa.string()),
        ("rfr_comment", pa.string()),
    ]
)


class _Partitions:
    """Hash partitions of one table by test_id, as Arrow IPC stream files: partition
    ``(test_id // stride) % n`` (``stride`` > 1 splits a partition of ``stride`` partitions again)."""

    def __init__(self, root: Path, name: str, n: int, schema: pa.Schema, stride: int = 1):
        self.paths = [root / f"{name}-{i:04d}.arrow" for i in range(n)]
        self.schema = schema
        self.stride = stride
        self._writers: dict[int, ipc.RecordBatchStreamWriter] = {}

    def write(self, df: pd.DataFrame) -> None:
        self.write_table(pa.Table.from_pandas(df, schema=self.schema, preserve_index=False))

    def write_table(self, table: pa.Table) -> None:
        n = len(self.paths)
        ids = table.column("test_id").to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        buckets = ids // self.stride % n
        if n > 1:  # one gather, then a slice per partition (a filter per partition scanned every row n times)
            order = np.argsort(buckets, kind="stable")  # rows keep their order within a partition
            table, buckets = table.take(pa.array(order)), buckets[order]
        bounds = np.searchsorted(buckets, np.arange(n + 1))
        try:
            for b in np.flatnonzero(np.diff(bounds)):
                w = self._writers.get(int(b))
                if w is None:
                    w = self._writers[int(b)] = ipc.new_stream(self.paths[int(b)], self.schema)
                w.write_table(table.slice(bounds[b], bounds[b + 1] - bounds[b]))
        except OSError as e:  # a full disk, or open files beyond the limit
            where = self.paths[0].parent
            if e.errno in (errno.EMFILE, errno.ENFILE):
                raise BulkResourceError(
                    f"cannot open another temporary partition file in {where}: {e}; the process holds "
                    f"{len(self._writers)} of them and other open files: raise the open-file limit (ulimit -n)"
                ) from e
            raise BulkResourceError(
                f"cannot write the temporary partition files in {where}: {e}; they need about as much free "
                "space as the input (uncompressed): choose another place with --tmp-dir or TMPDIR"
            ) from e

    def close(self) -> None:
        for w in self._writers.values():
            w.close()

    def abandon(self) -> None:
        """Close the files after a failure, quietly: the temporary directory is removed next."""
        for w in self._writers.values():
            try:
                w.close()
            except (OSError, pa.ArrowException):
                pass
        self._writers.clear()

    def read(self, i: int) -> pd.DataFrame:
        if not self.paths[i].exists():
            return self.schema.empty_table().to_pandas()
        with ipc.open_stream(self.paths[i]) as r:
            return r.read_all().to_pandas()

    def size(self, i: int) -> int:
        return self.paths[i].stat().st_size if self.paths[i].exists() else 0

    def split(self, i: int, into: _Partitions) -> None:
        """Stream partition ``i`` into ``into`` (rows keep their order), then delete it. Its batches are
        small (a block's share: ≈ 1/512 of it) and are gathered into ≈ ``_SPLIT_READ_BYTES`` before
        each write, so the sub-partitions do not get batches a further ``len(into.paths)`` times smaller."""
        if self.paths[i].exists():
            try:
                with ipc.open_stream(self.paths[i]) as r:
                    pending: list[pa.RecordBatch] = []
                    size = 0
                    for batch in r:
                        pending.append(batch)
                        size += batch.nbytes
                        if size >= _SPLIT_READ_BYTES:
                            into.write_table(pa.Table.from_batches(pending, schema=self.schema))
                            pending, size = [], 0
                    if pending:
                        into.write_table(pa.Table.from_batches(pending, schema=self.schema))
            except BaseException:
                into.abandon()
                raise
            self.paths[i].unlink()
        into.close()


class FileProgress:
    """A byte-granular bar's progress through one file of ``size`` bytes: called with the bytes just
    read, it never moves the bar past the file (a .gz's size may be an estimate); :meth:`finish`
    moves it to the file's end."""

    def __init__(self, bar: Any, size: int) -> None:
        self.bar, self.left = bar, size

    def __call__(self, k: int) -> None:
        step = min(k, self.left)
        if step > 0:
            self.left -= step
            self.bar.update(step)

    def finish(self) -> None:
        self(self.left)


class BulkReader:
    """Iterate tidy chunks from DVSA bulk files; ``report`` fills in as reading proceeds."""

    def __init__(
        self,
        paths: Sequence[Path],
        chunk_rows: int = 200_000,
        bucket_bytes: int = 32 << 20,
        tmp_dir: Path | None = None,
        max_partitions: int = _MAX_PARTITIONS,
    ):
        self.sources, self.api_paths = discover(paths)
        self.chunk_rows = chunk_rows
        self.bucket_bytes = bucket_bytes
        self.max_partitions = max_partitions
        self.tmp_dir = tmp_dir  # None: tempfile's choice ($TMPDIR, $TEMP, $TMP, else /tmp)
        self.report = BulkReport()
        kinds = {s.kind for s in self.sources}
        missing = [k for k in _REQUIRED_KINDS if k not in kinds]
        if missing:
            names = ", ".join(str(p) for p in paths)
            raise BulkFormatError(f"{names}:0: no {', '.join(missing)} table among the inputs")

    @property
    def partitions(self) -> int:
        """How many hash partitions the read uses (two open files each while reading)."""
        size = sum(s.size for s in self.sources if s.kind in ("test_result", "test_item"))
        return min(self.max_partitions, max(1, math.ceil(size / self.bucket_bytes)))

    def __iter__(self) -> Iterator[pd.DataFrame]:
        n = self.partitions
        ensure_open_files(2 * n + _SPARE_FILES)  # before any work, not after hours of it
        lookups = load_lookups(self.sources, self.report)
        big = [s for s in self.sources if s.kind in ("test_result", "test_item")]
        total = sum(s.size for s in big)
        quiet = total < 50 << 20  # as the other bars: shown for big inputs only
        root = Path(self.tmp_dir) if self.tmp_dir is not None else Path(tempfile.gettempdir())
        sweep_stale(root)  # what reads killed outright left
        with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=root) as tmp:
            (Path(tmp) / OWNER_FILE).write_text(f"{os.getpid()} {socket.gethostname()}\n")
            results = _Partitions(Path(tmp), "result", n, _RESULT_SCHEMA)
            items = _Partitions(Path(tmp), "item", n, _ITEM_SCHEMA)
            try:
                self._partition(big, results, items, quiet)
            except BaseException:
                results.abandon()  # open files would keep the temporary directory from being removed
                items.abandon()
                raise
            results.close()
            items.close()
            arrow_bytes = sum(p.size(i) for p in (results, items) for i in range(n))
            sub_bytes = max(self.bucket_bytes, _MIN_SUB_BYTES)
            with tqdm(total=n, unit="part", desc="join + label", disable=quiet) as bar:
                for i in range(n):
                    # the partition's share of the input, from its share of the Arrow bytes
                    share = total * (results.size(i) + items.size(i)) / max(1, arrow_bytes)
                    parts = [(results, items, i)]
                    if share > _SPLIT_ABOVE * sub_bytes:
                        parts = self._split(Path(tmp), results, items, i, math.ceil(share / sub_bytes))
                        bar.total += len(parts) - 1  # the bar counts what is joined
                        bar.refresh()
                    for res, it, j in parts:
                        tidy = self._join(res.read(j), it.read(j), lookups)
                        bar.update(1)  # before the yields: the caller's writing runs between them
                        for start in range(0, len(tidy), self.chunk_rows):
                            yield tidy.iloc[start : start + self.chunk_rows].reset_index(drop=True)

    def _split(
        self, root: Path, results: _Partitions, items: _Partitions, i: int, k: int
    ) -> list[tuple[_Partitions, _Partitions, int]]:
        """Split partition ``i`` of both tables into ``k`` (≤ 512) sub-partitions by ``test_id // n``
        (all its ids are ``i`` modulo ``n``); the partition's files are deleted once split."""
        k = min(k, _MAX_PARTITIONS)
        ensure_open_files(2 * k + _SPARE_FILES)
        n = len(results.paths)
        sub_res = _Partitions(root, f"result-{i:04d}", k, results.schema, stride=n)
        sub_it = _Partitions(root, f"item-{i:04d}", k, items.schema, stride=n)
        results.split(i, sub_res)
        items.split(i, sub_it)
        return [(sub_res, sub_it, j) for j in range(k)]

    def _partition(self, big: list[Source], results: _Partitions, items: _Partitions, quiet: bool) -> None:
        """Read the big tables into their hash partitions, with a byte-granular bar."""
        seq = 0
        with tqdm(total=sum(s.size for s in big), unit="B", unit_scale=True, desc="read bulk", disable=quiet) as bar:
            for src in big:
                fr = FileReport(src.name, src.kind, src.delimiter)
                self.report.files.append(fr)
                advance = FileProgress(bar, src.size)
                for raw in iter_raw(src, fr, self.chunk_rows, progress=advance):
                    if src.kind == "test_result":
                        typed = typed_results(raw, fr)
                    else:
                        typed = typed_items(raw, fr, seq)
                        seq += len(raw)
                    check_damage(src, fr)  # before writing: most rows bad is the wrong file
                    (results if src.kind == "test_result" else items).write(typed)
                advance.finish()

    def _join(self, res: pd.DataFrame, it: pd.DataFrame, lk: Lookups) -> pd.DataFrame:
        rep = self.report
        dup = res.duplicated("test_id", keep="first")
        rep.duplicate_tests += int(dup.sum())
        res = res[~dup]
        dup = it.duplicated(_ITEM_KEY, keep="first")
        rep.duplicate_items += int(dup.sum())
        it = it[~dup]
        m = it.merge(res, on="test_id", how="inner", sort=False)
        rep.orphan_items += len(it) - len(m)
        m = with_detail(m, lk.detail)
        known = m["rfr_desc"].notna()
        rep.unknown_rfr += int((~known).sum())
        m = m[known].sort_values("seq", kind="stable").reset_index(drop=True)
        if m.empty:
            return pd.DataFrame(columns=list(TIDY_COLUMNS))

        text, section, severity = label_defects(m, m["test_date"] >= pd.Timestamp(mot_labels.EU_CUTOFF), lk)
        age = (m["test_date"] - m["first_use_date"]).dt.days / 365.25
        # a reading beyond float32 (the column's type) would be inf there: missing
        mileage = m["test_mileage"].where(m["test_mileage"].between(0, float(np.finfo(np.float32).max)))
        out = pd.DataFrame(
            {
                "text": text,
                "section": section,
                "severity": severity,
                "make": m["make"],
                "model": m["model"],
                "fuel_type": m["fuel_type"],
                "vehicle_age_years": age.where((age >= 0) & (age < 150)).astype("float32"),
                "odometer_miles": mileage.astype("float32"),
                "test_date": m["test_date"],
                "test_id": m["test_id"].astype("int64"),
                "source": SOURCE_NAME,
                "split_group": defect_groups(m),
            }
        )
        labelled = (out["section"] >= 0) & out["severity"].notna()
        rep.unlabelled += int((~labelled).sum())
        out = out[labelled].reset_index(drop=True)
        rep.add_labels(out)
        return out


def read_bulk(
    paths: Sequence[Path], chunk_rows: int = 200_000, report: BulkReport | None = None, tmp_dir: Path | None = None
) -> Iterator[pd.DataFrame]:
    """Tidy chunks from DVSA bulk files; pass ``report`` (or use :class:`BulkReader`) to get the counts."""
    reader = BulkReader(paths, chunk_rows, tmp_dir=tmp_dir)
    if report is not None:
        reader.report = report
    yield from reader
