"""Local append-only spool: Arrow IPC segments written with fsync + atomic rename, replayed in order.

Segment file name: ``{seq:016d}-{rows}-{token}-{sha256}.arrow``. The token is the batch's
``insert_deduplication_token`` (and the Parquet sink's file name), so a replay after a crash
between "inserted" and "removed" stores the batch once. ``sha256`` (16 hex digits of the file's
sha256) is checked before a segment is kept or replayed: a mismatch (a block of zeros after a power
cut) sets it aside as ``*.corrupt``. Segments of releases before the checksum
(``{seq}-{rows}-{token}.arrow``) get Arrow's full validation and the row count only. When the spool
would exceed ``max_bytes`` the policy applies: ``drop_oldest`` deletes the oldest segments (but the
one being inserted and those whose removal failed, left to its retry) once the new one is on disk
(recent predictions matter most for canary and drift; a write that fails deletes nothing; nor does one
that ends once the writer froze the spool for its final counts), and refuses a new batch older than
those it would have to delete (one appended late at its place); ``drop_newest`` refuses the new
batch; the rows lost are returned so the writer counts them as ``dropped{reason="spool_full"}``.

A spool is bound to its sink (:class:`~predlog.settings.SinkId`, recorded in ``.sink``): segments a
writer finds there for another sink are moved to ``held/<sink>/``, kept and never replayed into this
one, and moved back when a writer on their sink opens the spool. Segments an older release left with no
``.sink`` are replayed by a ClickHouse writer (that release spooled every ClickHouse batch) and held as
``held/unrecorded/`` by an embedded one (the log a dropped ClickHouse setting falls back to).
"""

from __future__ import annotations

import bisect
import fcntl
import hashlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pyarrow as pa

from motlens.atomic import atomic_write, remove_stale_temps
from predlog.settings import SinkId

log = logging.getLogger(__name__)

_SEG = re.compile(r"^(\d{16})-(\d+)-([0-9a-f]{32})(?:-([0-9a-f]{16}))?\.arrow$")
SINK_FILE = ".sink"
HELD = "held"
#: ``held/`` folder of segments an older release spooled without recording their sink
UNRECORDED = "unrecorded"
#: the spool of the server's audit rows (``promotion_events``), a spool of its own inside the spool folder
EVENTS_SPOOL = "events"
#: how often a writer makes its directory again when it is moved away before its lock file opens
_MOVED_RETRIES = 50


@dataclass(frozen=True, order=True)
class Segment:
    seq: int
    rows: int
    token: str
    path: Path
    bytes: int = field(compare=False)  # what it counts in the spool's size (kept if the file is damaged)
    digest: str | None = field(default=None, compare=False)  # from its name; None: an older release's segment


def _digest(data: bytes | pa.Buffer) -> str:
    """What a segment's name records of its content: the first 16 hex digits of its sha256."""
    return hashlib.sha256(memoryview(data)).hexdigest()[:16]


def _seq(seg: Segment) -> int:
    return seg.seq


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _finish_tmp(tmp: Path) -> None:
    """A segment its writer left as ``*.tmp`` (killed before the rename): renamed into place if it matches
    its checksum and reads back whole and valid with the rows its name says, else set aside as
    ``*.corrupt`` (never replayed).
    Called with the spool's lock held."""
    m = _SEG.match(tmp.name.removesuffix(".tmp"))
    try:
        data = tmp.read_bytes()
    except OSError as e:
        log.error("predlog: cannot read spool segment %s (%s); left for the next start", tmp.name, e)
        return
    try:
        whole = m is not None and _decode(pa.py_buffer(data), m.group(4)).num_rows == int(m.group(2))
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


def _rows(files: list[Path]) -> int:
    return sum(int(m.group(2)) for p in files if (m := _SEG.match(p.name)))


def _warn_held(folder: Path, files: list[Path], held_for: SinkId | None, sink: SinkId, spool: Path) -> None:
    """Name held segments, the two sinks and what to do (at every start while they are held)."""
    if held_for is None:
        whose = (
            "spooled by a release that recorded no sink, most likely for ClickHouse (such a release spooled "
            "every ClickHouse batch, an embedded writer only a failed write); a writer on ClickHouse "
            "(MOTLENS_CLICKHOUSE_URL) replays them"
        )
    else:
        whose = f"spooled for {held_for}; a writer on that sink replays them"
    log.warning(
        "predlog: %d rows (%d segment file(s)) in %s are kept there, not replayed into this writer's sink, %s: "
        "they were %s. To store them in this sink instead, stop this process and move the *.arrow files from "
        "%s into %s (docs/predlog.md: a spool is bound to its sink)",
        _rows(files), len(files), folder, sink, whose, folder, spool,
    )  # fmt: skip


class SegmentDamaged(ValueError):
    """A segment's content does not match the checksum in its name."""


def _decode(buf: pa.Buffer, digest: str | None) -> pa.Table:
    """A segment's table: its checksum checked (a block of zeros can still parse with the right row count
    and changed values), then fully validated (all a segment of an older release, with no checksum, gets)."""
    if digest is not None and _digest(buf) != digest:
        raise SegmentDamaged(f"content does not match its checksum {digest}")
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


def _existing_lock(root: Path) -> IO[bytes] | None:
    """The spool's lock file opened read-only (enough for ``flock``), None when there is none to open."""
    try:
        return open(root / ".lock", "rb")  # noqa: SIM115 - held until close()
    except OSError:
        return None


def lock_if_free(root: Path) -> IO[bytes] | None:
    """The spool's existing lock file, locked, when no process holds it and it is still the file at
    ``.lock`` (a lock on one moved away meanwhile guards nothing); None otherwise. Close it to let go."""
    lock_file = _existing_lock(root)
    if lock_file is None or not _flocked(lock_file):
        return None
    if not same_file(lock_file, root / ".lock"):
        lock_file.close()
        return None
    return lock_file


def _flocked(lock_file: IO[bytes]) -> bool:
    """Lock ``lock_file`` if no other process holds it (no wait); else close it and say so."""
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock_file.close()
        return False
    return True


def same_file(opened: IO[bytes], path: Path) -> bool:
    """Whether ``opened`` is (still) the file at ``path``."""
    try:
        return os.path.samestat(os.fstat(opened.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


def _segment_files(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if _SEG.match(p.name))
    except FileNotFoundError:
        return []


def _recorded(folder: Path) -> SinkId | None:
    """The sink recorded in ``folder`` (None: none recorded, or a record that cannot be read)."""
    try:
        return SinkId.from_json((folder / SINK_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("predlog: unreadable %s (%s): its segments count as unrecorded", folder / SINK_FILE, e)
        return None


def _held_name(sink: SinkId | None) -> str:
    if sink is None:
        return UNRECORDED
    if sink.kind == "embedded":
        return "embedded"
    return "clickhouse-" + hashlib.sha256(f"{sink.url}\n{sink.database}".encode()).hexdigest()[:12]


class Spool:
    """A directory of ordered segments owned by one writer (an exclusive lock; thread-safe inside it).

    Segments are ordered by their sequence number, which a batch can take before it is written
    (:meth:`reserve`), so a batch written late keeps its place. Appends hold the spool's lock through
    their fsync; what is there (:meth:`segments`, :meth:`count`, :attr:`rows`, :attr:`bytes`) is read
    without it, so a disk that hangs holds up no reader. Taking out the head and appending at the end
    (a drain, a backlog growing) cost one copy of the list, at C speed, and no scan.

    With ``sink`` the spool is bound to it (module docstring); without, it takes whatever is there."""

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        policy: str = "drop_oldest",
        sink: SinkId | None = None,
        *,
        report: bool = True,
        lock_wait_s: float = 0.0,
    ):
        """``report``: log the one ERROR line of a spool that cannot be used this run (off for a second
        spool of the same folder, whose first one said it already). ``lock_wait_s``: how long to wait for
        a lock another process holds before :class:`SpoolBusy` (0: refuse at once)."""
        self.root = root
        self.max_bytes = max_bytes
        self.policy = policy
        self._lock = threading.Lock()
        #: guards only the next sequence number (never held through I/O)
        self._seq_lock = threading.Lock()
        #: the segment being inserted (:meth:`head`): the full policy leaves it to its insert
        self._sending: Segment | None = None
        #: segments whose removal failed (:meth:`remove`, :meth:`set_aside`): left to their caller's retry,
        #: never deleted by the full policy (their rows are counted already)
        self._stuck: set[Segment] = set()
        #: the writer has made its final counts (:meth:`freeze`): the full policy deletes nothing any more
        self.frozen = False
        #: rows the full policy has deleted since the spool was opened (read without the lock)
        self.evicted = 0
        #: why the spool cannot be used this run (it cannot be written (read-only, no permission) or bound
        #: to its sink (disk full)): it then neither takes nor replays segments, and the writer stores
        #: straight into the sink
        self.unbound: str | None = None
        self._lock_file = self._take_lock(lock_wait_s)
        try:
            self._open(sink)
        except BaseException:
            self.close()
            raise
        if self.unbound is not None and report:
            log.error(
                "predlog: cannot bind the spool %s to %s (%s): nothing is spooled or replayed until a start "
                "that can; batches go straight to the prediction log, and what it does not take is dropped "
                "(spool_error)", root, sink, self.unbound,
            )  # fmt: skip

    def _take_lock(self, wait_s: float) -> IO[bytes] | None:
        """The spool's lock file, locked: :class:`SpoolBusy` while another process holds it after ``wait_s``.
        A lock taken on a file that is no longer the one at ``.lock`` (``motlens log replay`` deleted the
        drained directory meanwhile) does not count: the directory is made again and locked afresh."""
        root = self.root
        deadline = time.monotonic() + wait_s
        said = False
        moved = 0  # times the directory went between making it and opening its lock
        while True:
            lock_file: IO[bytes] | None
            self.unbound = None  # what this try finds
            try:
                root.mkdir(parents=True, exist_ok=True)
                lock_file = open(root / ".lock", "ab+")  # noqa: SIM115 - held until close()
            except FileNotFoundError as e:  # moved aside meanwhile (a replay removing it): make it again
                moved += 1
                if moved < _MOVED_RETRIES:
                    continue
                self.unbound = str(e)
                lock_file = None
            except OSError as e:
                self.unbound = str(e)
                lock_file = _existing_lock(root)  # another writer's lock still counts
            if lock_file is None:
                return None
            if not _flocked(lock_file):
                if time.monotonic() >= deadline:
                    raise SpoolBusy(root)
                if not said:
                    log.warning("predlog: another process holds the spool %s; waiting up to %.0f s", root, wait_s)
                    said = True
                time.sleep(0.2)
                continue
            if same_file(lock_file, root / ".lock"):
                return lock_file
            lock_file.close()  # unlocks it

    def _open(self, sink: SinkId | None) -> None:
        root = self.root
        #: in order; replaced, never changed in place, under the lock (read without it)
        self._segments: tuple[Segment, ...] = ()
        #: the segment of each token (the first in order), kept with ``_segments`` under the lock
        self._tokens: dict[str, Segment] = {}
        self._seq = 0
        self._bytes = 0
        self._rows = 0
        #: rows left in ``held/`` for another sink once bound (they never change while this spool is open)
        self.held_rows = 0
        if self.unbound is not None:
            return
        remove_stale_temps(root / SINK_FILE)
        for stale in root.glob("*.tmp"):
            _finish_tmp(stale)
        if sink is not None:
            try:
                self._bind(sink)
            except OSError as e:
                self.unbound = str(e)
                return
        self._segments = tuple(
            sorted(
                Segment(int(m.group(1)), int(m.group(2)), m.group(3), p, p.stat().st_size, m.group(4))
                for p in root.iterdir()
                if (m := _SEG.match(p.name))
            )
        )
        held = [int(p.name[:16]) for folder in self._held_folders() for p in _segment_files(folder)]
        self._seq = max([s.seq for s in self._segments] + held, default=-1) + 1  # unique across held ones too
        for seg in self._segments:
            self._tokens.setdefault(seg.token, seg)
        self._bytes = sum(s.bytes for s in self._segments)
        self._rows = sum(s.rows for s in self._segments)
        self.held_rows = sum(_rows(_segment_files(folder)) for folder in self._held_folders())

    def _held_folders(self) -> list[Path]:
        try:
            return sorted(p for p in (self.root / HELD).iterdir() if p.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _bind(self, sink: SinkId) -> None:
        """Hold another sink's segments, record ``sink``, take back its held ones (lock held); each step
        leaves a state the next start finishes if this one is killed."""
        recorded = _recorded(self.root)
        present = _segment_files(self.root)
        if present and (recorded is None or not recorded.same(sink)):
            if recorded is None and sink.kind == "clickhouse":
                log.warning(
                    "predlog: %d spooled rows left by a release that recorded no sink are replayed into %s",
                    _rows(present), sink,
                )  # fmt: skip
            else:
                self._move(present, self.root / HELD / _held_name(recorded), recorded)
        if recorded != sink:  # before any segment comes back: a crash meanwhile leaves them recorded as ours
            atomic_write(self.root / SINK_FILE, sink.to_json())
        for folder in self._held_folders():
            found = _recorded(folder)
            if (found is not None and found.same(sink)) or (folder.name == UNRECORDED and sink.kind == "clickhouse"):
                self._take_back(folder, found, sink)
        for folder in self._held_folders():
            if files := _segment_files(folder):
                _warn_held(folder, files, _recorded(folder), sink, self.root)

    def _move(self, files: list[Path], folder: Path, sink: SinkId | None) -> None:
        """Move segments into ``folder`` (recording their sink there first, when known)."""
        folder.mkdir(parents=True, exist_ok=True)
        if sink is not None and _recorded(folder) != sink:
            atomic_write(folder / SINK_FILE, sink.to_json())
        for path in files:
            os.replace(path, folder / path.name)
        _fsync_dir(folder)
        _fsync_dir(self.root)

    def _take_back(self, folder: Path, found: SinkId | None, sink: SinkId) -> None:
        """Move a held folder's segments back into the spool for ``sink`` and remove the folder."""
        files = _segment_files(folder)
        clash = [p for p in files if (self.root / p.name).exists()]
        for path in files:
            if path not in clash:
                os.replace(path, self.root / path.name)
        _fsync_dir(self.root)
        if clash:
            log.error("predlog: %s holds segments named as ones in the spool (%s); left there", folder, clash[0].name)
            return
        if files:
            whose = f"spooled for {found}" if found else "spooled by a release that recorded no sink"
            log.warning("predlog: %d rows held in %s (%s) are replayed into %s", _rows(files), folder, whose, sink)
        remove_stale_temps(folder / SINK_FILE)
        (folder / SINK_FILE).unlink(missing_ok=True)
        for empty in (folder, folder.parent):
            try:
                empty.rmdir()
            except OSError:  # something else left there: kept for whoever put it
                return

    def segments(self) -> list[Segment]:
        return list(self._segments)

    def count(self) -> int:
        return len(self._segments)

    def reserve(self) -> int:
        """A sequence number for a batch to be appended later (:meth:`append`'s ``seq``): it goes before
        every batch that reserves (or is appended) after it."""
        with self._seq_lock:
            self._seq += 1
            return self._seq - 1

    def head(self) -> Segment | None:
        """The oldest segment, marked as being inserted until :meth:`head_done`: the full policy does not
        delete it meanwhile (the insert may store it)."""
        with self._lock:
            self._sending = self._segments[0] if self._segments else None
            return self._sending

    def head_done(self) -> None:
        with self._lock:
            self._sending = None

    def freeze(self) -> None:
        """The writer makes its final counts: from now on the full policy deletes nothing (a write that ends
        later lands over the limit; the next start's policy applies). Set without the lock, which a write
        whose fsync hangs may hold."""
        self.frozen = True

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def bytes(self) -> int:
        return self._bytes

    def append(self, table: pa.Table, token: str, seq: int | None = None) -> tuple[Segment | None, int]:
        """Durably add a batch, in its place by ``seq`` (:meth:`reserve`; default: last); returns (segment
        or None if refused, rows dropped by the full policy). A token the spool holds is not written again:
        that segment is returned.

        Under ``drop_oldest`` the oldest segments are deleted only once the new one is on disk, so a
        write that fails (disk full) raises with every older segment still in place."""
        if self.unbound is not None:
            raise OSError(f"the spool is not bound to its sink this run ({self.unbound})")
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
        data = sink.getvalue()
        digest = _digest(data)
        with self._lock:
            if (held := self._tokens.get(token)) is not None:
                return held, 0
            if self._bytes + data.size > self.max_bytes and (
                self.policy == "drop_newest" or data.size > self.max_bytes or self._oldest(seq, data.size)
            ):
                return None, table.num_rows
            seq = self.reserve() if seq is None else seq
            seg = Segment(
                seq,
                table.num_rows,
                token,
                self.root / f"{seq:016d}-{table.num_rows}-{token}-{digest}.arrow",
                data.size,
                digest,
            )
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
            # frozen while this write hung (close() gave up on it): the writer counts no eviction any more.
            # A freeze between this check and the end of the eviction still deletes: that window remains.
            dropped = 0 if self.frozen else self._evict_for(data.size)
            segs = self._segments
            at = len(segs) if not segs or segs[-1] < seg else bisect.bisect(segs, seg)
            self._segments = segs[:at] + (seg,) + segs[at:]
            self._tokens.setdefault(token, seg)
            self._bytes += data.size
            self._rows += seg.rows
            try:
                _fsync_dir(self.root)
            except OSError as e:  # the segment is in place: counting it as lost would count it twice
                log.warning("predlog: fsync of the spool directory failed (%s)", e)
            return seg, dropped

    def _oldest(self, seq: int | None, size: int) -> bool:
        """A segment at ``seq`` would itself be the next to go to make room for it: the older segments
        the full policy may delete do not free ``size`` bytes (lock held)."""
        if seq is None:
            return False
        need = self._bytes + size - self.max_bytes
        for old in self._segments:
            if need <= 0:
                return False
            if old.seq > seq:
                return True
            if old is not self._sending and old not in self._stuck:
                need -= old.bytes
        return False

    def _evict_for(self, size: int) -> int:
        """Delete the oldest segments until ``size`` more bytes fit (lock held), all but the one being
        inserted and those whose removal failed; returns their rows (and adds them to :attr:`evicted`)."""
        dropped = 0
        for old in self._segments:  # this snapshot: _forget replaces the tuple
            if self._bytes + size <= self.max_bytes:
                break
            if old is self._sending or old in self._stuck:
                continue
            try:
                old.path.unlink(missing_ok=True)
            except OSError as e:  # kept (and still counted in the spool): over the limit for now
                log.warning("predlog: cannot delete spool segment %s (%s)", old.path.name, e)
                break
            self._forget(old)
            dropped += old.rows
            self.evicted += old.rows
        return dropped

    def close(self) -> None:
        """Release the spool for the next writer."""
        if self._lock_file is not None and not self._lock_file.closed:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
            self._lock_file.close()

    @staticmethod
    def read(seg: Segment) -> pa.Table:
        """The segment's table, checked against its checksum and validated: a damaged one raises (the
        writer sets it aside)."""
        with pa.memory_map(str(seg.path)) as src:
            return _decode(src.read_buffer(), seg.digest)

    def set_aside(self, seg: Segment, suffix: str = ".corrupt") -> Path:
        """Take a segment out of the spool (and its byte count), kept as ``*.corrupt`` (unreadable) or
        ``*.rejected`` (refused by ClickHouse for good); neither is replayed nor ever deleted. A rename that
        raises leaves it in the spool, for the caller to retry."""
        aside = seg.path.with_suffix(suffix)
        with self._lock:
            try:
                if seg.path.exists():
                    seg.path.rename(aside)
            except OSError:
                self._stuck.add(seg)
                raise
            self._forget(seg)
        return aside

    def remove(self, seg: Segment) -> None:
        """Delete a segment (one gone already counts as deleted); an unlink that raises leaves it in the
        spool, for the caller to retry."""
        with self._lock:
            try:
                seg.path.unlink(missing_ok=True)
            except OSError:
                self._stuck.add(seg)
                raise
            self._forget(seg)

    def _forget(self, seg: Segment) -> None:
        """Take a segment out of the spool's list and counts (lock held): found by its seq (the head, in a
        drain, at once), and the list copied without it."""
        self._stuck.discard(seg)
        segs = self._segments
        at = bisect.bisect_left(segs, seg.seq, key=_seq)
        while at < len(segs) and segs[at].seq == seg.seq and segs[at] != seg:  # a seq twice: moved in from held/
            at += 1
        if at == len(segs) or segs[at] != seg:
            return
        self._segments = segs[:at] + segs[at + 1 :]
        if self._tokens.get(seg.token) is segs[at]:
            del self._tokens[seg.token]
        self._bytes -= seg.bytes
        self._rows -= seg.rows
