"""Local append-only spool: Arrow IPC segments written with fsync + atomic rename, replayed in order.

Segment file name: ``{seq:016d}-{rows}-{token}.arrow``. The token is the batch's
``insert_deduplication_token`` (and the Parquet sink's file name), so a replay after a crash
between "inserted" and "removed" stores the batch once. When the spool would exceed
``max_bytes`` the policy applies: ``drop_oldest`` deletes the oldest segments once the new one
is on disk (recent predictions matter most for canary and drift; a write that fails deletes
nothing), ``drop_newest`` refuses the new batch; the rows lost are returned so the writer counts
them as ``dropped{reason="spool_full"}``.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

log = logging.getLogger(__name__)

_SEG = re.compile(r"^(\d{16})-(\d+)-([0-9a-f]{32})\.arrow$")


@dataclass(frozen=True, order=True)
class Segment:
    seq: int
    rows: int
    token: str
    path: Path
    bytes: int = field(compare=False)  # what it counts in the spool's size (kept if the file is damaged)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_tmp(tmp: Path) -> None:
    """A segment its writer left as ``*.tmp`` (killed before the rename): renamed into place if it reads
    back whole and valid with the rows its name says, else set aside as ``*.corrupt`` (never replayed).
    Called with the spool's lock held."""
    m = _SEG.match(tmp.name.removesuffix(".tmp"))
    try:
        data = tmp.read_bytes()
    except OSError as e:
        log.error("predlog: cannot read spool segment %s (%s); left for the next start", tmp.name, e)
        return
    try:
        whole = m is not None and _decode(pa.py_buffer(data)).num_rows == int(m.group(2))
    except Exception:  # noqa: BLE001 - cut short or damaged: Arrow raises several kinds
        whole = False
    try:
        if not whole:
            tmp.rename(tmp.with_suffix("").with_suffix(".corrupt"))  # as set_aside names it
            log.warning("predlog: incomplete or damaged spool segment %s set aside as .corrupt", tmp.name)
            return
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, tmp.with_suffix(""))
    except OSError as e:
        log.error("predlog: cannot keep or set aside spool segment %s (%s); left for the next start", tmp.name, e)
        return
    log.warning("predlog: spool segment %s, written in full before its writer stopped, kept", tmp.stem)


def _decode(buf: pa.Buffer) -> pa.Table:
    """A segment's table, fully validated (a block of zeros can still parse with the right row count)."""
    table = pa.ipc.open_file(buf).read_all()
    table.validate(full=True)
    return table


class SpoolBusy(RuntimeError):
    """Another process (a running ``motlens serve``, a demo) holds the spool's lock."""

    def __init__(self, root: Path) -> None:
        self.root = root
        super().__init__(
            f"another motlens process (a running `motlens serve`?) owns the prediction-log spool {root}; stop it, "
            "or give each writer process its own MOTLENS_PREDLOG_DIR"
        )


def check_free(root: Path) -> None:
    """Raise :class:`SpoolBusy` when a writer holds the spool at ``root``, as :class:`Spool` would:
    the same lock taken and released at once (a check before work that would open a writer later;
    creates nothing, and a spool that does not exist yet is free)."""
    try:
        lock_file = open(root / ".lock", "rb")  # noqa: SIM115 - closed below
    except FileNotFoundError:
        return
    with lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise SpoolBusy(root) from None
        fcntl.flock(lock_file, fcntl.LOCK_UN)


class Spool:
    """A directory of ordered segments owned by one writer (an exclusive lock; thread-safe inside it)."""

    def __init__(self, root: Path, max_bytes: int, policy: str = "drop_oldest"):
        self.root = root
        self.max_bytes = max_bytes
        self.policy = policy
        root.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(root / ".lock", "a+")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            raise SpoolBusy(root) from None
        self._lock = threading.Lock()
        for stale in root.glob("*.tmp"):
            _finish_tmp(stale)
        self._segments: list[Segment] = sorted(
            Segment(int(m.group(1)), int(m.group(2)), m.group(3), p, p.stat().st_size)
            for p in root.iterdir()
            if (m := _SEG.match(p.name))
        )
        self._seq = self._segments[-1].seq + 1 if self._segments else 0
        self._bytes = sum(s.bytes for s in self._segments)

    def segments(self) -> list[Segment]:
        with self._lock:
            return list(self._segments)

    @property
    def rows(self) -> int:
        with self._lock:
            return sum(s.rows for s in self._segments)

    @property
    def bytes(self) -> int:
        with self._lock:
            return self._bytes

    def append(self, table: pa.Table, token: str) -> tuple[Segment | None, int]:
        """Durably add a batch; returns (segment or None if refused, rows dropped by the full policy).

        Under ``drop_oldest`` the oldest segments are deleted only once the new one is on disk, so a
        write that fails (disk full) raises with every older segment still in place."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        data = sink.getvalue()
        with self._lock:
            if self._bytes + data.size > self.max_bytes and (
                self.policy == "drop_newest" or data.size > self.max_bytes
            ):
                return None, table.num_rows
            seg = Segment(
                self._seq,
                table.num_rows,
                token,
                self.root / f"{self._seq:016d}-{table.num_rows}-{token}.arrow",
                data.size,
            )
            self._seq += 1
            tmp = seg.path.with_name(seg.path.name + ".tmp")
            try:
                with open(tmp, "wb") as f:
                    f.write(data.to_pybytes())
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, seg.path)
            except OSError:
                tmp.unlink(missing_ok=True)  # a partial segment must not be replayed
                raise
            dropped = self._evict_for(data.size)
            self._segments.append(seg)
            self._bytes += data.size
            try:
                _fsync_dir(self.root)
            except OSError as e:  # the segment is in place: counting it as lost would count it twice
                log.warning("predlog: fsync of the spool directory failed (%s)", e)
            return seg, dropped

    def _evict_for(self, size: int) -> int:
        """Delete the oldest segments until ``size`` more bytes fit (lock held); returns their rows."""
        dropped = 0
        while self._segments and self._bytes + size > self.max_bytes:
            old = self._segments[0]
            try:
                old.path.unlink(missing_ok=True)
            except OSError as e:  # kept (and still counted in the spool): over the limit for now
                log.warning("predlog: cannot delete spool segment %s (%s)", old.path.name, e)
                break
            self._segments.pop(0)
            self._bytes -= old.bytes
            dropped += old.rows
        return dropped

    def close(self) -> None:
        """Release the spool for the next writer."""
        if not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    @staticmethod
    def read(seg: Segment) -> pa.Table:
        """The segment's table, validated: a damaged one raises (the writer sets it aside)."""
        with pa.memory_map(str(seg.path)) as src:
            return _decode(src.read_buffer())

    def set_aside(self, seg: Segment, suffix: str = ".corrupt") -> Path:
        """Take a segment out of the spool (and its byte count), kept as ``*.corrupt`` (unreadable) or
        ``*.rejected`` (refused by ClickHouse for good); neither is replayed nor ever deleted."""
        with self._lock:
            if seg in self._segments:
                self._segments.remove(seg)
                self._bytes -= seg.bytes
            aside = seg.path.with_suffix(suffix)
            if seg.path.exists():
                seg.path.rename(aside)
            return aside

    def remove(self, seg: Segment) -> None:
        with self._lock:
            if seg in self._segments:
                self._segments.remove(seg)
                self._bytes -= seg.bytes
            seg.path.unlink(missing_ok=True)
