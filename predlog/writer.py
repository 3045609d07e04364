"""The prediction-log writer the predictor uses: never blocks, never raises, loses nothing it can keep.

``submit`` appends to a bounded in-memory queue (full → ``dropped{reason="queue_full"}``). Two
background threads share the work, so a sink that hangs never holds batches in memory:

* the **batcher** takes batches of ``batch_rows`` (or whatever arrived within
  ``settings.flush_interval``: 1 s to ClickHouse, 10 s for the embedded log unless set), encodes each
  once as Arrow and puts it on local disk; it never waits on the sink:

  - remote sink (ClickHouse): every batch goes to the spool first (fsync'd Arrow IPC segment, a
    write-ahead copy);
  - local Parquet sink: a batch is handed to the sender when it is idle and the spool is empty (one
    batch at most; no write-ahead copy), else it goes to the spool behind the ones there.

* the **sender** does all sink I/O: it stores the handed-on batch (an embedded batch whose write fails
  goes to the spool), then drains the spool in order into the sink with each segment's token as
  ``insert_deduplication_token`` (the Parquet file's name), removing each stored segment. A failed
  insert leaves the segment (``rows_spilled``) and retries with exponential backoff; later batches
  queue behind it in the spool, so replay keeps order and stores each row exactly once. A segment
  ClickHouse refuses for good (a schema or type error, ``predlog.sinks.PERMANENT_CODES``) is set aside
  as ``*.rejected`` (kept, counted as ``dropped{reason="rejected"}``) and the ones behind it go on; an
  error of a materialized view on the table is retried (the rows are stored; the token deduplicates).

Audit rows (``promotion_events``, :meth:`PredictionLogWriter.record_event`) take the same way through
their own spool (``spool/events/``) and backoff: spooled at once, stored by the sender in order.

``close`` (called on SIGTERM) spools the queue, tries the sink once more and leaves whatever the sink
did not take in the spool for the next start; a sink that hangs past its timeout is left behind, and so
is a spool disk that hangs (what is not on disk by the timeout is counted as dropped). What ``close``
reports is final: an insert or a spool write it gave up on that ends later changes no count and no
segment (the spool keeps such a batch: its token makes the next start's replay store it once).

Every batch has one owner at a time, changed only under the writer's lock: the batcher (its claim), the
sender (the handed-on batch, the audit rows waiting in memory) or ``close`` (what it took over), and only
the owner counts it. Nothing holds the writer's lock while it waits on the sink or the disk.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from predlog import metrics
from predlog.migrate import SchemaError
from predlog.records import PredictionRecord
from predlog.schema import records_to_arrow, row_to_arrow
from predlog.settings import PredlogSettings
from predlog.sinks import Sink, permanent_error
from predlog.spool import Segment, Spool

log = logging.getLogger(__name__)

#: audit rows kept in memory while their spool cannot take them (read-only, disk full), for the sender
MAX_PENDING_EVENTS = 1000

_OPEN: weakref.WeakSet[PredictionLogWriter] = weakref.WeakSet()


def writer_of(settings: PredlogSettings) -> PredictionLogWriter | None:
    """The writer this process opened with ``settings`` (the same object), if any."""
    return next((w for w in list(_OPEN) if w.settings is settings), None)


@dataclass(frozen=True, eq=False)
class _Batch:
    """A batch with no spool copy (yet), with its place in its spool (``seq``, reserved when it was formed):
    handed to the sender (the embedded store's, spooled if the write fails; or one the spool could not
    take, ``lost_as``: counted so if the sink does not take it either), an audit row waiting in memory, or
    one ``close`` spools."""

    table: pa.Table
    token: str
    seq: int
    lost_as: str | None = None


@dataclass(eq=False)
class _Claim:
    """The batch the batcher took off the queue, until it is in the spool or handed on."""

    records: list[PredictionRecord]
    token: str
    seq: int
    #: once encoded (its bad rows counted)
    table: pa.Table | None = None
    #: its spool write is under way: only the batcher learns how it ends (close() does not take it over)
    writing: bool = False


class _Lane:
    """One table's way into the log: its sink, its spool, its backoff and its counts."""

    def __init__(self, table: str, sink: Sink, spool: Spool, settings: PredlogSettings, lock: threading.Condition):
        self.table, self.sink, self.spool = table, sink, spool
        self._settings = settings
        self._lock = lock
        self.counts = {"written": 0, "spilled": 0, "replayed": 0}
        self.dropped: dict[str, int] = {}
        #: tokens spooled this run while the sink was fine: counted as spilled only if an insert fails first
        self.fresh: set[str] = set()
        #: the rows of the spool's :attr:`~predlog.spool.Spool.evicted` counted as dropped so far
        self.evicted = 0
        self.ok = True
        self.retry_at = 0.0
        self._backoff = settings.retry_initial_s

    @property
    def predictions(self) -> bool:
        return self.table == "predictions"

    def due(self, now: float) -> bool:
        return now >= self.retry_at

    def add(self, key: str, n: int) -> None:
        with self._lock:
            self.counts[key] += n
        if self.predictions:
            {"written": metrics.ROWS_WRITTEN, "spilled": metrics.ROWS_SPILLED, "replayed": metrics.ROWS_REPLAYED}[
                key
            ].inc(n)

    def drop(self, n: int, reason: str) -> None:
        if n <= 0:
            return
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        (metrics.ROWS_DROPPED if self.predictions else metrics.EVENTS_DROPPED).labels(reason=reason).inc(n)

    def count_evictions(self) -> None:
        """Count the rows the spool's full policy deleted since the last call as ``spool_full`` (``_lock``
        held), whichever write deleted them."""
        evicted = self.spool.evicted
        self.drop(evicted - self.evicted, "spool_full")
        self.evicted = evicted

    def spooled(self, seg: Segment) -> None:
        """A batch written to the spool this run: spilled now if the sink is failing, else left to the sender."""
        with self._lock:
            if self.ok:
                self.fresh.add(seg.token)
                return
        self.add("spilled", seg.rows)

    def stored(self, seg: Segment) -> None:
        with self._lock:
            fresh = seg.token in self.fresh
            self.fresh.discard(seg.token)
        self.add("written", seg.rows)
        if not fresh:
            self.add("replayed", seg.rows)

    def count_fresh_as_spilled(self) -> None:
        """The sink failed (or the writer stops): this run's segments still spooled count as spilled."""
        with self._lock:
            left = {s.token: s.rows for s in self.spool.segments()}
            tokens, self.fresh = self.fresh, set()
            for token in tokens & left.keys():
                self.add("spilled", left[token])

    def succeeded(self) -> None:
        if not self.ok:
            log.info("predlog: %s back; replaying the spool", "sink is" if self.predictions else "promotion_events is")
        self.ok = True
        self._backoff = self._settings.retry_initial_s
        self.retry_at = 0.0

    def failed(self, e: Exception) -> None:
        if self.ok and self.predictions:
            log.warning("predlog: sink insert failed (%s: %s); spooling and retrying", type(e).__name__, e)
        elif self.ok:
            log.warning(
                "predlog: cannot store promotion_events rows (%s: %s); they are kept and retried. On ClickHouse "
                "the predictor's user needs INSERT on promotion_events (docs/deploy.md)",
                type(e).__name__, str(e)[:300],
            )  # fmt: skip
        self.ok = False
        self.retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self._settings.retry_max_s)


class PredictionLogWriter:
    """Background batching writer; see the module docstring for the delivery guarantees."""

    def __init__(self, sink: Sink, spool: Spool, settings: PredlogSettings, events: tuple[Sink, Spool]):
        """``events``: the sink and spool of ``promotion_events`` rows (:meth:`record_event`)."""
        self.sink = sink
        self.spool = spool
        self.settings = settings
        self._queue: deque[PredictionRecord] = deque()
        self._cond = threading.Condition()
        self._rows = _Lane("predictions", sink, spool, settings, self._cond)
        self._events = _Lane("promotion_events", *events, settings, self._cond)
        #: audit rows their spool could not take, in record order (``seq``), for the sender to store
        self._pending_events: list[_Batch] = []
        #: no audit row waits in memory any more: the sender's last pass spooled them (or close() took them)
        self._events_final = False
        #: audit rows record_event() is spooling (close() waits for them, counting those not on disk in time)
        self._recording: set[_Batch] = set()
        self._inflight = 0
        self._closed = False
        self._stopping = False
        #: the batcher has put every batch on disk or handed it on (or close() took over its work)
        self._batches_done = False
        #: close() is done waiting; whichever thread (or record_event() call) ends last releases the sinks and
        #: the spools (their locks)
        self._abandoned = False
        self._live = 2
        self._flush_requested = False
        #: the batch handed to the sender, until it is stored (or spooled, or counted as dropped)
        self._handoff: _Batch | None = None
        #: the sender is in a pass (storing, replaying)
        self._busy = False
        #: the batch the batcher took off the queue, until it is in the spool (or handed on)
        self._claimed: _Claim | None = None
        #: close() took over the sender's work: what the sender does from then on changes no count and no spool
        self._took_over = False
        #: spooled segments counted as stored or set aside whose removal from their spool is under way (or
        #: failed: retried at the head), with the suffix they are set aside with (None: deleted); stats() leaves
        #: them out of the spool
        self._leaving: dict[Segment, str | None] = {}
        #: batches close() took over, spooled in order by its helper thread (``predlog-close``)
        self._orphans: deque[tuple[_Lane, _Batch]] = deque()
        self._closer: threading.Thread | None = None
        metrics.SPOOL_HELD_ROWS.set(spool.held_rows)
        #: the embedded log's background compaction (set by ``open_writer``), stopped by close()
        self.compactor: Any = None
        self._thread = threading.Thread(target=self._run, name="predlog-writer", daemon=True)
        self._sender = threading.Thread(target=self._send, name="predlog-sender", daemon=True)
        self._thread.start()
        self._sender.start()
        _OPEN.add(self)
        atexit.register(self._atexit)

    # -- public API -------------------------------------------------------------------------
    def submit(self, records: Sequence[PredictionRecord]) -> None:
        """Queue rows for logging; returns at once and never raises."""
        try:
            if not records:
                return
            with self._cond:
                if self._closed:
                    self._drop(len(records), "closed")
                    return
                room = self.settings.queue_rows - len(self._queue)
                if room < len(records):
                    self._drop(len(records) - max(room, 0), "queue_full")
                    records = records[: max(room, 0)]
                self._queue.extend(records)
                metrics.QUEUE_DEPTH.set(len(self._queue))
                if len(self._queue) >= self.settings.batch_rows:
                    self._cond.notify_all()
        except Exception:  # noqa: BLE001 - a log failure must never fail a request
            log.exception("predlog: submit failed")

    def record_event(self, row: dict[str, Any]) -> bool:
        """Store one ``promotion_events`` row: written to the audit spool at once (fsync'd), stored in the
        log by the sender in record order (never waiting on the sink here). While the spool cannot take it
        (read-only, disk full) it waits in memory for the sender, retried with backoff. False when it is
        lost (counted in ``motlens_predlog_events_dropped_total``); never raises."""
        lane = self._events
        try:
            table = row_to_arrow("promotion_events", row)
        except Exception as e:  # noqa: BLE001 - an audit row must never stop serving
            log.error("predlog: cannot record a promotion_events row of %s (%s)", row.get("action"), e)
            lane.drop(1, "invalid")
            return False
        with self._cond:
            if self._closed:
                lane.drop(1, "closed")
                return False
            event = _Batch(table, uuid.uuid4().hex, lane.spool.reserve())
            self._recording.add(event)
            self._live += 1  # the spools stay locked until this call ends
        try:
            kept = self._write_ahead(lane, event)
            with self._cond:
                if event not in self._recording:
                    return False  # not on disk within close()'s timeout: counted as dropped there
                self._recording.discard(event)
                self._cond.notify_all()
                if isinstance(kept, Segment):
                    lane.spooled(kept)
                elif self._events_final or len(self._pending_events) >= MAX_PENDING_EVENTS:
                    lane.drop(1, kept)  # no sender will take it from memory any more (or too many wait)
                    return False
                else:
                    bisect.insort(self._pending_events, event, key=lambda e: e.seq)
            return True
        finally:
            self._ended()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row submitted so far is in the spool or the sink, and the sender has tried the
        sink with it (a sink that hangs is waited for up to ``timeout``). False if rows are still only in
        memory at ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flush_requested = True
            self._cond.notify_all()
            while self._in_memory() or self._busy or self._due():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not (self._thread.is_alive() or self._sender.is_alive()):
                    return not self._in_memory()
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Spool the queue, try the sink once more, stop; rows the sink did not take stay in the spool.
        Everything (the compactor's stop, waited for only with what is left, included) takes at most
        ``timeout`` seconds. The threads get three quarters of it; what one still holds then (a sink or a
        spool disk that hangs) is spooled from a helper thread in the rest, and what is not on disk by
        ``timeout`` is counted as dropped (``spool_error``). The counts are final when it returns."""
        deadline = time.monotonic() + timeout
        threads_until = deadline - timeout / 4
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
        if self.compactor is not None:
            self.compactor.stop()
        self._thread.join(max(0.0, threads_until - time.monotonic()))
        atexit.unregister(self._atexit)
        if self._thread.is_alive():  # slow, or its spool disk hangs: what it holds goes to the spool from here
            self._take_batcher_work()
        with self._cond:
            self._batches_done = True
            self._cond.notify_all()
        self._sender.join(max(0.0, threads_until - time.monotonic()))
        if self._sender.is_alive():  # the sink (or the spool's disk) hangs: keep what it holds on local disk
            self._take_sender_work()
            log.warning("predlog: writer did not stop within %.1fs; unsent rows kept in the spool", timeout)
        self._settle(deadline)
        if self.compactor is not None:  # a daemon thread; a merge cut short is finished by the next run
            self.compactor.close(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._abandoned = True
            self._cond.notify_all()
            release = self._live == 0  # else the last thread releases them when it ends
        if release:
            self._release()
        metrics.QUEUE_DEPTH.set(0)

    @property
    def unbound(self) -> str | None:
        """Why one of this writer's spools (the predictions', the audit rows') cannot be used this run."""
        return self.spool.unbound or self._events.spool.unbound

    def stats(self) -> dict[str, Any]:
        rows, events = self._rows, self._events
        with self._cond:
            held = self._in_spool(rows)
            return {
                **rows.counts,
                "dropped": sum(rows.dropped.values()),
                "dropped_by_reason": dict(rows.dropped),
                "queue_depth": len(self._queue),
                "spool_rows": sum(s.rows for s in held),
                "spool_bytes": sum(s.bytes for s in held),
                "spool_segments": len(held),
                "spool_held_rows": self.spool.held_rows,
                "sink_ok": rows.ok,
                "events": {
                    "written": events.counts["written"],
                    "replayed": events.counts["replayed"],
                    "spool_held_rows": events.spool.held_rows,
                    "dropped_by_reason": dict(events.dropped),
                    "spool_rows": sum(s.rows for s in self._in_spool(events)),
                    "pending": len(self._pending_events),
                    "sink_ok": events.ok,
                },
            }

    # -- shared state (``_cond`` held) ---------------------------------------------------------
    def _lanes(self) -> list[_Lane]:
        return [self._events, self._rows]

    def _in_spool(self, lane: _Lane) -> list[Segment]:
        """The segments in ``lane``'s spool but those counted as stored or set aside (read without the spool's
        lock: an append holds it through its fsync)."""
        return [s for s in lane.spool.segments() if s not in self._leaving]

    def _in_memory(self) -> bool:
        """Submitted rows neither on local disk nor in the sink yet."""
        return bool(self._queue or self._inflight or self._handoff is not None)

    def _due(self) -> bool:
        """The sender has work it should do now."""
        now = time.monotonic()
        return (
            self._handoff is not None
            or bool(self._pending_events and self._events.due(now))
            or any(lane.spool.count() and lane.due(now) for lane in self._lanes())
        )

    def _next_retry_s(self) -> float | None:
        """Seconds until a lane with work waiting comes off its backoff (None: no work waits)."""
        now = time.monotonic()
        waits = [
            lane.retry_at - now
            for lane in self._lanes()
            if lane.spool.count() or (lane is self._events and self._pending_events)
        ]
        return max(0.0, min(waits)) if waits else None

    # -- the batcher thread -----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    deadline = time.monotonic() + self.settings.flush_interval
                    while not (self._stopping or self._flush_requested) and len(self._queue) < self.settings.batch_rows:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._cond.wait(remaining)
                    n = min(len(self._queue), self.settings.batch_rows)
                    batch = [self._queue.popleft() for _ in range(n)]
                    if not self._queue:
                        self._flush_requested = False
                    self._inflight = n
                    claim = self._claimed = _Claim(batch, uuid.uuid4().hex, self.spool.reserve()) if batch else None
                    stop = self._stopping and not self._queue
                try:
                    if claim is not None:
                        self._store(claim)
                except Exception:  # noqa: BLE001 - the thread must survive anything
                    log.exception("predlog: writer loop error")
                finally:
                    with self._cond:
                        self._inflight = 0
                        if self._claimed is claim:
                            self._claimed = None
                        metrics.QUEUE_DEPTH.set(len(self._queue))
                        self._cond.notify_all()
                    metrics.SPOOL_BYTES.set(self.spool.bytes)
                if stop:
                    return
        finally:
            with self._cond:
                self._batches_done = True
                self._cond.notify_all()
            self._ended()

    def _store(self, claim: _Claim) -> None:
        """Put a batch on local disk (or hand it on to the sender); never waits on the sink. The claim is
        checked under the lock at each step: close() may have taken the batch over meanwhile."""
        table, invalid = self._encode(claim.records)
        lane = self._rows
        with self._cond:
            if self._claimed is not claim:
                return
            lane.drop(invalid, "invalid")
            if table is None:
                self._claimed = None
                return
            claim.table = table
        batch = _Batch(table, claim.token, claim.seq)
        if self.sink.local and self._hand_off(claim, batch, wait=0.0):
            return
        with self._cond:
            if self._claimed is not claim:
                return
            claim.writing = True
        kept = self._write_ahead(lane, batch)
        with self._cond:
            if self._claimed is not claim:  # the sender took it on from the spool, or close() counted it
                return
            claim.writing = False
            self._cond.notify_all()
            if isinstance(kept, Segment):
                self._claimed = None
                lane.spooled(kept)
                return
        # no durable copy (disk full, or a batch the spool refuses): straight to a healthy sink
        if lane.due(time.monotonic()) and self._hand_off(
            claim, replace(batch, lost_as=kept), wait=self.settings.flush_interval
        ):
            return
        with self._cond:
            if self._claimed is claim:
                self._claimed = None
                lane.drop(table.num_rows, kept)

    def _write_ahead(self, lane: _Lane, batch: _Batch) -> Segment | str:
        """Spool a batch at its place: its segment (the one there already for its token), or why it is not
        spooled (the drop reason). Counts only the older segments the full policy deleted (under
        ``drop_oldest``, for this write or one before), unless close() froze the spool for its final counts."""
        if lane.spool.unbound is not None:  # not bound this run (said once, at start): no write-ahead copy
            return "spool_error"
        try:
            seg, _ = lane.spool.append(batch.table, batch.token, batch.seq)
        except OSError as e:
            log.error("predlog: spool write of %d %s rows failed (%s)", batch.table.num_rows, lane.table, e)
            return "spool_error"
        with self._cond:
            if not lane.spool.frozen:  # else close() counted them last
                lane.count_evictions()
        return seg if seg is not None else "spool_full"

    def _hand_off(self, claim: _Claim, batch: _Batch, *, wait: float) -> bool:
        """Give the batch to the sender (the batcher's claim goes with it). An embedded batch (``lost_as``
        None) only to a sender that is idle with an empty spool (spooled batches go first); one the spool
        could not take waits up to ``wait`` seconds for a batch handed on before to be taken."""
        deadline = time.monotonic() + wait
        with self._cond:
            while self._handoff is not None and not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            if self._claimed is not claim:
                return True  # close() took it over meanwhile
            if self._handoff is not None or (batch.lost_as is None and (self._busy or self.spool.count())):
                return False
            self._claimed, self._handoff = None, batch
            self._cond.notify_all()
        return True

    # -- the sender thread ------------------------------------------------------------------
    def _send(self) -> None:
        try:
            self._prepare()
            while True:
                with self._cond:
                    while not (self._abandoned or self._batches_done or self._due()):
                        self._cond.wait(self._next_retry_s())
                    if self._abandoned:
                        return
                    final = self._batches_done
                    self._busy = True
                try:
                    self._pass(final)
                except Exception as e:  # noqa: BLE001 - the thread must survive anything
                    log.exception("predlog: writer loop error")
                    for lane in self._lanes():  # and not try again at once
                        lane.failed(e)
                finally:
                    with self._cond:
                        self._busy = False
                        self._cond.notify_all()
                    metrics.SPOOL_BYTES.set(self.spool.bytes)
                if final:
                    return
        finally:
            self._ended()

    def _prepare(self) -> None:
        """Connect (and migrate) at start, so a new deployment's tables exist before its first batch and
        readers (drift, the promotion gates) find them; a server that is down is retried at the first batch."""
        prepare = getattr(self.sink, "prepare", None)
        if prepare is None:
            return
        try:
            prepare()
        except SchemaError:
            return  # logged by the sink, once
        except Exception as e:  # noqa: BLE001 - only an early attempt: batches go to the spool until it works
            log.warning("predlog: prediction log not reachable at start (%s); batches are spooled until it is",
                        str(e).splitlines()[0] if str(e) else type(e).__name__)  # fmt: skip

    def _pass(self, final: bool) -> None:
        """Store the handed-on batch, then the audit rows, then replay the spool (``final``: whatever the
        backoff, the writer stops after it)."""
        self._send_handoff()
        self._drain(self._events, final)
        if not self._drain(self._rows, final) or final:
            self._rows.count_fresh_as_spilled()
        if final:
            self._keep_pending_events()

    def _send_handoff(self) -> None:
        """Store the handed-on batch; an embedded one the sink did not take goes to the spool at its place.
        It stays the handed-on batch (close()'s to take over) until it is stored, spooled or counted."""
        with self._cond:
            h = self._handoff
        if h is None:
            return
        lane, n = self._rows, h.table.num_rows
        error = self._insert_or_error(lane, h.table, h.token)
        why = None if error is None else permanent_error(error)
        if error is not None and why is None:
            lane.failed(error)
        kept = self._write_ahead(lane, h) if error is not None and why is None and h.lost_as is None else None
        with self._cond:
            if self._handoff is not h:  # close() took it over (and counted it)
                return
            self._handoff = None
            self._cond.notify_all()
            if error is None:
                lane.add("written", n)
            elif why is not None:
                lane.drop(n, "rejected")
            elif h.lost_as is not None:
                lane.drop(n, h.lost_as)
            elif kept is not None:
                self._count_spool_write(lane, n, kept)
        if why is not None:
            log.error("predlog: ClickHouse refuses a batch for good (%s); %d %s rows dropped", why, n, lane.table)

    def _send_pending_events(self) -> bool:
        """The audit rows waiting in memory that were recorded before the spool's head (all while it is
        empty; read again after each row), in order, until one fails (False)."""
        lane = self._events
        while True:
            with self._cond:
                head = next(iter(lane.spool.segments()), None)
                if not self._pending_events or (head is not None and self._pending_events[0].seq > head.seq):
                    return not self._took_over
                event = self._pending_events[0]
            error = self._insert_or_error(lane, event.table, event.token)
            why = None if error is None else permanent_error(error)
            if error is not None and why is None:
                lane.failed(error)
                return False
            with self._cond:
                if event not in self._pending_events:
                    return False  # close() took them over
                self._pending_events.remove(event)
                if why is None:
                    lane.add("written", 1)
                else:
                    lane.drop(1, "rejected")
            if why is not None:
                log.error("predlog: ClickHouse refuses a promotion_events row for good (%s); dropped", why)

    def _keep_pending_events(self) -> None:
        """The writer stops: audit rows still in memory go to their spool (each stays close()'s to take over
        until it is there), else they are counted as lost."""
        lane = self._events
        while True:
            with self._cond:
                if not self._pending_events:
                    self._events_final = True
                    return
                event = self._pending_events[0]
            kept = self._write_ahead(lane, event)
            with self._cond:
                if event not in self._pending_events:
                    return  # close() took them over
                self._pending_events.remove(event)
                self._count_spool_write(lane, 1, kept)

    def _insert_or_error(self, lane: _Lane, table: pa.Table, token: str) -> Exception | None:
        try:
            self._insert(lane, table, token)
        except Exception as e:  # noqa: BLE001 - the caller decides (retry, reject, spool)
            return e
        return None

    def _drain(self, lane: _Lane, force: bool) -> bool:
        """Replay ``lane``'s spooled segments in order (the audit rows waiting in memory in their place
        among them) until one fails (none while backing off unless ``force``); False when the sink failed."""
        if not force and not lane.due(time.monotonic()):
            return False
        while True:
            seg = lane.spool.head()
            try:
                with self._cond:
                    if self._took_over:
                        return False
                    if seg is not None and lane is self._rows:
                        self._adopt(seg)
                if lane is self._events:
                    if not self._send_pending_events():
                        return False
                    if seg != next(iter(lane.spool.segments()), None):
                        continue  # a row recorded before the rest was spooled meanwhile: it goes first
                if seg is None:
                    return True
                with self._cond:
                    counted = seg in self._leaving  # only its removal failed before
                if not (counted or self._replay(lane, seg)) or not self._leave(lane, seg):
                    return False
            finally:
                lane.spool.head_done()

    def _adopt(self, seg: Segment) -> None:
        """A segment of the batch the batcher is still spooling: the sender counts it (``_cond`` held)."""
        claim = self._claimed
        if claim is not None and claim.token == seg.token:
            self._claimed = None
            self._rows.spooled(seg)
            self._cond.notify_all()

    def _replay(self, lane: _Lane, seg: Segment) -> bool:
        """Store a spooled segment; False when it stays (the sink failed, or close() took over)."""
        try:
            table = Spool.read(seg)
        except Exception:  # noqa: BLE001 - a corrupt segment must not block the rest
            log.exception("predlog: unreadable spool segment %s set aside", seg.path.name)
            return self._count_out(lane, seg, "invalid", ".corrupt")
        error = self._insert_or_error(lane, table, seg.token)
        if error is None:
            return self._count_out(lane, seg, None, None)
        if (why := permanent_error(error)) is None:
            lane.failed(error)
            return False
        if not self._count_out(lane, seg, "rejected", ".rejected"):
            return False
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        log.error(
            "predlog: ClickHouse refuses spool segment %s for good (%s: %s); %d rows kept as %s, not retried "
            "(docs/predlog.md: a rejected segment)", seg.path.name, why, first[:500], seg.rows,
            seg.path.with_suffix(".rejected"),
        )  # fmt: skip
        return True

    def _count_out(self, lane: _Lane, seg: Segment, reason: str | None, suffix: str | None) -> bool:
        """Count a segment as stored (``reason`` None) or dropped for ``reason`` while the sender still owns
        it, and mark it to leave the spool (set aside with ``suffix``, else deleted). False once close() took
        over: close() counted it as left in the spool (the next start's replay stores it once)."""
        with self._cond:
            if self._took_over:
                return False
            if reason is None:
                lane.stored(seg)
            else:
                lane.drop(seg.rows, reason)
                lane.fresh.discard(seg.token)
            self._leaving[seg] = suffix
        return True

    def _leave(self, lane: _Lane, seg: Segment) -> bool:
        """Take a counted segment out of its spool: deleted once stored, else kept as ``*.rejected`` (refused
        by ClickHouse for good, never replayed, so the batches behind it go on) or ``*.corrupt``. False when
        that fails: it stays at the head, not counted again, retried after a backoff."""
        with self._cond:
            suffix = self._leaving[seg]
        try:
            if suffix is None:
                lane.spool.remove(seg)
            else:
                lane.spool.set_aside(seg, suffix)
        except OSError as e:
            log.error("predlog: cannot take spool segment %s out of the spool (%s); retried", seg.path.name, e)
            lane.failed(e)
            return False
        with self._cond:
            del self._leaving[seg]
        return True

    def _insert(self, lane: _Lane, table: pa.Table, token: str) -> None:
        t0 = time.perf_counter()
        lane.sink.insert(table, token)
        if lane.predictions:
            metrics.INSERT_SECONDS.observe(time.perf_counter() - t0)
        lane.succeeded()

    # -- close() and the end ----------------------------------------------------------------
    def _take_batcher_work(self) -> None:
        """The batcher outlasted close()'s wait: its claimed batch (unless its spool write is under way) and
        the queue go to the spool from here."""
        with self._cond:
            rest = list(self._queue)
            self._queue.clear()
            claim = self._claimed if self._claimed is not None and not self._claimed.writing else None
            if claim is not None:
                self._claimed = None
            rest_seq = self.spool.reserve()
        batches = []
        if claim is not None:
            table = claim.table
            if table is None:
                table, invalid = self._encode(claim.records)
                self._drop(invalid, "invalid")
            if table is not None:
                batches.append(_Batch(table, claim.token, claim.seq))
        if rest:
            table, invalid = self._encode(rest)
            self._drop(invalid, "invalid")
            if table is not None:
                batches.append(_Batch(table, uuid.uuid4().hex, rest_seq))
        with self._cond:
            for batch in batches:
                self._orphan(self._rows, batch)

    def _take_sender_work(self) -> None:
        """The sender outlasted close()'s wait: close() counts from now on; what the sender holds in memory,
        the batch handed to it and the audit rows that wait, go to the spool from here."""
        with self._cond:
            self._took_over = self._events_final = True
            h, self._handoff = self._handoff, None
            pending, self._pending_events = self._pending_events, []
            if h is not None and h.lost_as is not None:
                self._rows.drop(h.table.num_rows, h.lost_as)
            elif h is not None:
                self._orphan(self._rows, h)
            for event in pending:
                self._orphan(self._events, event)
            self._cond.notify_all()

    def _orphan(self, lane: _Lane, batch: _Batch) -> None:
        """Queue a batch close() took over for its helper thread to spool (``_cond`` held)."""
        self._orphans.append((lane, batch))
        if self._closer is None:
            self._live += 1
            self._closer = threading.Thread(target=self._spool_orphans, name="predlog-close", daemon=True)
            self._closer.start()

    def _spool_orphans(self) -> None:
        """close()'s helper: spool the batches it took over, in order, each counted if close() still waits
        for it (a spool disk that hangs holds up this thread, never close())."""
        try:
            while True:
                with self._cond:
                    if not self._orphans:
                        self._closer = None
                        return
                    lane, batch = self._orphans[0]
                kept = self._write_ahead(lane, batch)
                with self._cond:
                    if self._orphans and self._orphans[0][1] is batch:
                        self._orphans.popleft()
                        self._count_spool_write(lane, batch.table.num_rows, kept)
                        self._cond.notify_all()
        finally:
            self._ended()

    def _settle(self, deadline: float) -> None:
        """close()'s last step: audit rows still in memory (the sender's last pass did not end) go to its
        helper; it waits for the helper, for a batch the batcher is spooling and for the audit rows
        record_event() calls are spooling until ``deadline``; what is still not on disk then (a spool disk
        that hangs) is counted as dropped (``spool_error``), and this run's segments left in the spool as
        spilled. The spools are frozen: a write or insert that ends after this changes no count and deletes
        no segment."""
        with self._cond:
            self._events_final = True
            pending, self._pending_events = self._pending_events, []
            for event in pending:
                self._orphan(self._events, event)
            while (self._orphans or self._recording or (self._claimed is not None and self._claimed.writing)) and (
                remaining := deadline - time.monotonic()
            ) > 0:
                self._cond.wait(remaining)
            self._took_over = True
            for lane in self._lanes():  # a write that ends later deletes no segment these counts include
                lane.spool.freeze()
                lane.count_evictions()
            left, self._orphans = list(self._orphans), deque()
            claim, self._claimed = self._claimed, None
            h, self._handoff = self._handoff, None  # handed on after the sender's last pass
            lost = [(lane, b.table.num_rows) for lane, b in left]
            if claim is not None:
                lost.append((self._rows, claim.table.num_rows if claim.table is not None else len(claim.records)))
            if h is not None:
                lost.append((self._rows, h.table.num_rows))
            if self._recording:
                lost.append((self._events, len(self._recording)))
                self._recording.clear()
            for lane, n in lost:
                lane.drop(n, "spool_error")
            self._rows.count_fresh_as_spilled()
            self._cond.notify_all()
        if lost:
            log.error(
                "predlog: %d rows were not on disk within close()'s timeout (the spool's disk hangs); counted as "
                "dropped (spool_error)", sum(n for _, n in lost)
            )  # fmt: skip

    def _count_spool_write(self, lane: _Lane, rows: int, kept: Segment | str) -> None:
        """Count a batch the sink did not take: spilled, or dropped for why the spool did not take it."""
        if isinstance(kept, Segment):
            lane.add("spilled", kept.rows)
        else:
            lane.drop(rows, kept)

    def _ended(self) -> None:
        """A thread (or a record_event() call) ends; the last one releases the sinks and spools if close()
        stopped waiting for it."""
        with self._cond:
            self._live -= 1
            release = self._live == 0 and self._abandoned
        if release:
            self._release()

    def _release(self) -> None:
        for lane in self._lanes():
            lane.sink.close()
            lane.spool.close()

    def _encode(self, batch: list[PredictionRecord]) -> tuple[pa.Table | None, int]:
        """The batch as Arrow and how many rows were left out (unencodable; for the caller to count)."""
        try:
            return records_to_arrow(batch), 0
        except Exception:  # noqa: BLE001 - isolate the bad rows, keep the good ones
            good = []
            for r in batch:
                try:
                    records_to_arrow([r])
                    good.append(r)
                except Exception as e:  # noqa: BLE001
                    log.warning("predlog: dropping an unencodable row (%s)", e)
            return (records_to_arrow(good) if good else None), len(batch) - len(good)

    def _drop(self, n: int, reason: str) -> None:
        self._rows.drop(n, reason)

    def _atexit(self) -> None:
        self.close(timeout=5.0)
