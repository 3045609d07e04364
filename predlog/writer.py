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
did not take in the spool for the next start; a sink that hangs past its timeout is left behind.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True)
class _Handoff:
    """A batch for the sender to store that has no spool copy: the embedded store's (spooled if the write
    fails), or one the spool could not take (``lost_as``: counted so if the sink does not take it either)."""

    table: pa.Table
    token: str
    lost_as: str | None = None


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
        left = {s.token: s.rows for s in self.spool.segments()}
        with self._lock:
            tokens, self.fresh = self.fresh, set()
        for token in tokens:
            if token in left:
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
        #: audit rows their spool could not take, oldest first, for the sender to store
        self._pending_events: deque[tuple[pa.Table, str]] = deque()
        self._inflight = 0
        self._closed = False
        self._stopping = False
        #: the batcher has put every batch on disk or handed it on (or close() took over its work)
        self._batches_done = False
        #: close() is done waiting; whichever thread ends last releases the sinks and the spools (their locks)
        self._abandoned = False
        self._live = 2
        self._flush_requested = False
        #: the batch handed to the sender, until it is stored (or spooled, or counted as dropped): close()
        #: spills it if the sender outlasts the timeout; a replay of the same token stores it once
        self._handoff: _Handoff | None = None
        #: the sender is in a pass (storing, replaying)
        self._busy = False
        #: the batch the batcher took off the queue, until it is in the spool (or handed on): close()
        #: spills it if the batcher outlasts the timeout; both writes carry the batch's token, so a copy
        #: written twice is stored once
        self._claimed: tuple[list[PredictionRecord], str] | None = None
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
        log by the sender (never waiting on the sink here). While the spool cannot take it (read-only, disk
        full) it waits in memory for the sender, retried with backoff. False when it is lost (counted in
        ``motlens_predlog_events_dropped_total``); never raises."""
        lane = self._events
        try:
            table = row_to_arrow("promotion_events", row)
        except Exception as e:  # noqa: BLE001 - an audit row must never stop serving
            log.error("predlog: cannot record a promotion_events row of %s (%s)", row.get("action"), e)
            lane.drop(1, "invalid")
            return False
        token = uuid.uuid4().hex
        with self._cond:
            if self._closed:
                lane.drop(1, "closed")
                return False
        kept = self._write_ahead(lane, table, token)
        with self._cond:
            if isinstance(kept, str):
                if len(self._pending_events) >= MAX_PENDING_EVENTS:
                    lane.drop(1, kept)
                    return False
                self._pending_events.append((table, token))
            self._cond.notify_all()
        return True

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
        ``timeout`` seconds: a sink that hangs longer is left behind, the rows it holds spooled."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._stopping = True
            self._cond.notify_all()
        if self.compactor is not None:
            self.compactor.stop()
        self._thread.join(timeout)
        atexit.unregister(self._atexit)
        if self._thread.is_alive():  # the spool's disk hangs: try again from here
            self._spill_batcher_work()
        with self._cond:
            self._batches_done = True
            self._cond.notify_all()
        self._sender.join(max(0.0, deadline - time.monotonic()))
        if self._sender.is_alive():  # the sink hangs: keep what it holds on local disk
            self._spill_sender_work()
            log.warning("predlog: writer did not stop within %.1fs; unsent rows kept in the spool", timeout)
        if self.compactor is not None:  # a daemon thread; a merge cut short is finished by the next run
            self.compactor.close(max(0.0, deadline - time.monotonic()))
        with self._cond:
            self._abandoned = True
            self._cond.notify_all()
            release = self._live == 0  # else the last thread releases them when it ends
        if release:
            self._release()
        metrics.QUEUE_DEPTH.set(0)

    def stats(self) -> dict[str, Any]:
        rows, events = self._rows, self._events
        spool = {  # read before taking the writer's lock: an append holds the spool's through its fsync
            "spool_rows": self.spool.rows,
            "spool_bytes": self.spool.bytes,
            "spool_segments": self.spool.count(),
            "spool_held_rows": self.spool.held_rows,
        }
        events_spooled = events.spool.rows
        with self._cond:
            return {
                **rows.counts,
                "dropped": sum(rows.dropped.values()),
                "dropped_by_reason": dict(rows.dropped),
                "queue_depth": len(self._queue),
                **spool,
                "sink_ok": rows.ok,
                "events": {
                    "written": events.counts["written"],
                    "dropped_by_reason": dict(events.dropped),
                    "spool_rows": events_spooled,
                    "pending": len(self._pending_events),
                    "sink_ok": events.ok,
                },
            }

    # -- shared state (``_cond`` held) ---------------------------------------------------------
    def _lanes(self) -> list[_Lane]:
        return [self._events, self._rows]

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
                    self._claimed = (batch, uuid.uuid4().hex) if batch else None
                    stop = self._stopping and not self._queue
                try:
                    if batch:
                        self._store(batch, self._claimed[1])  # type: ignore[index]
                except Exception:  # noqa: BLE001 - the thread must survive anything
                    log.exception("predlog: writer loop error")
                finally:
                    with self._cond:
                        self._inflight = 0
                        self._claimed = None
                        metrics.QUEUE_DEPTH.set(len(self._queue))
                        metrics.SPOOL_BYTES.set(self.spool.bytes)
                        self._cond.notify_all()
                if stop:
                    return
        finally:
            with self._cond:
                self._batches_done = True
                self._cond.notify_all()
            self._ended()

    def _store(self, batch: list[PredictionRecord], token: str) -> None:
        """Put a batch on local disk (or hand it on to the sender); never waits on the sink."""
        table = self._encode(batch)
        if table is None or not self._owns(token):  # not owned: close() spilled it meanwhile
            return
        lane = self._rows
        if self.sink.local and self._hand_off(table, token, None, wait=0.0):
            return
        kept = self._write_ahead(lane, table, token)
        if not isinstance(kept, str):
            return
        # no durable copy (disk full, or a batch the spool refuses): straight to a healthy sink
        if lane.due(time.monotonic()) and self._hand_off(table, token, kept, wait=self.settings.flush_interval):
            return
        self._release_claim(token)
        lane.drop(table.num_rows, kept)

    def _write_ahead(self, lane: _Lane, table: pa.Table, token: str) -> Segment | str:
        """Spool a batch for the sender: its segment, or why it is not spooled (the drop reason)."""
        if lane.spool.unbound is not None:  # not bound this run (said once, at start): no write-ahead copy
            return "spool_error"
        try:
            seg, dropped = lane.spool.append(table, token)
        except OSError as e:
            log.error(
                "predlog: spool write failed (%s); the batch goes straight to the sink if it is up, else it is "
                "dropped (spool_error)", e,
            )  # fmt: skip
            return "spool_error"
        if seg is None:
            return "spool_full"
        lane.drop(dropped, "spool_full")  # older segments, under drop_oldest
        self._release_claim(token)  # in the spool: close() must not spool it again
        lane.spooled(seg)
        with self._cond:
            self._cond.notify_all()
        return seg

    def _hand_off(self, table: pa.Table, token: str, lost_as: str | None, *, wait: float) -> bool:
        """Give the batch to the sender (the batcher's claim goes with it). An embedded batch (``lost_as``
        None) only to a sender that is idle with an empty spool (spooled batches go first); one the spool
        could not take waits up to ``wait`` seconds for a batch handed on before to be taken."""
        deadline = time.monotonic() + wait
        with self._cond:
            while self._handoff is not None and not self._stopping and (remaining := deadline - time.monotonic()) > 0:
                self._cond.wait(remaining)
            if not self._owns(token):
                return True  # close() spilled it meanwhile
            if self._handoff is not None or (lost_as is None and (self._busy or self.spool.count())):
                return False
            self._claimed, self._handoff = None, _Handoff(table, token, lost_as)
            self._cond.notify_all()
        return True

    def _release_claim(self, token: str) -> None:
        """The batch is in the spool (or the sink): no longer close()'s to spill."""
        with self._cond:
            if self._claimed is not None and self._claimed[1] == token:
                self._claimed = None

    def _owns(self, token: str) -> bool:
        with self._cond:
            return self._claimed is not None and self._claimed[1] == token

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
                        metrics.SPOOL_BYTES.set(self.spool.bytes)
                        self._cond.notify_all()
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
        self._send_pending_events(final)
        self._drain(self._events, final)
        if not self._drain(self._rows, final) or final:
            self._rows.count_fresh_as_spilled()
        if final:
            self._keep_pending_events()

    def _send_handoff(self) -> None:
        with self._cond:
            h = self._handoff
        if h is None:
            return
        stored = self._try_insert(self._rows, h.table, h.token)
        with self._cond:
            if self._handoff is not h:  # close() spilled it meanwhile
                return
            self._handoff = None
            self._cond.notify_all()
        if stored:
            return
        if h.lost_as is None:
            self._spill(self._rows, h.table, h.token)  # the embedded store's batch: replayed later
        else:
            self._rows.drop(h.table.num_rows, h.lost_as)

    def _send_pending_events(self, force: bool) -> None:
        """Audit rows their spool could not take, in order, until one fails."""
        lane = self._events
        if not force and not lane.due(time.monotonic()):
            return
        while not self._abandoned:
            with self._cond:
                if not self._pending_events:
                    return
                table, token = self._pending_events[0]
            stored = self._try_insert(lane, table, token)
            if not stored:
                return
            with self._cond:
                if self._pending_events and self._pending_events[0][1] == token:
                    self._pending_events.popleft()

    def _keep_pending_events(self) -> None:
        """The writer stops: audit rows still in memory go to their spool, else they are counted as lost."""
        with self._cond:
            pending, self._pending_events = list(self._pending_events), deque()
        for table, token in pending:
            self._spill(self._events, table, token)

    def _try_insert(self, lane: _Lane, table: pa.Table, token: str) -> bool:
        """Insert now; on failure note it (backoff, or ``rejected`` when no retry would pass) and say so."""
        try:
            self._insert(lane, table, token)
        except Exception as e:  # noqa: BLE001
            if (why := permanent_error(e)) is not None:
                log.error(
                    "predlog: ClickHouse refuses a batch for good (%s); %d %s rows dropped", why, table.num_rows,
                    lane.table,
                )  # fmt: skip
                lane.drop(table.num_rows, "rejected")
                return True  # handled: not the caller's to spill or count again
            lane.failed(e)
            return False
        lane.add("written", table.num_rows)
        return True

    def _drain(self, lane: _Lane, force: bool) -> bool:
        """Replay ``lane``'s spooled segments in order until one fails (none while backing off unless
        ``force``); False when the sink failed."""
        if not force and not lane.due(time.monotonic()):
            return False
        while not self._abandoned:
            seg = lane.spool.head()
            if seg is None:
                return True
            try:
                try:
                    table = Spool.read(seg)
                except Exception:  # noqa: BLE001 - a corrupt segment must not block the rest
                    log.exception("predlog: unreadable spool segment %s set aside", seg.path.name)
                    lane.spool.set_aside(seg)
                    lane.drop(seg.rows, "invalid")
                    continue
                try:
                    self._insert(lane, table, seg.token)
                except Exception as e:  # noqa: BLE001
                    if (why := permanent_error(e)) is None:
                        lane.failed(e)
                        return False
                    if not self._reject(lane, seg, why, e):
                        return False
                    continue
                lane.spool.remove(seg)
                lane.stored(seg)
            finally:
                lane.spool.head_done()
        return False

    def _reject(self, lane: _Lane, seg: Segment, why: str, e: Exception) -> bool:
        """A segment ClickHouse refuses for good (``PERMANENT_CODES``) leaves the spool as ``*.rejected``
        (kept, never replayed) so the batches behind it go on; its rows count as ``rejected``. False when
        it cannot be set aside (kept at the head, retried after a backoff)."""
        try:
            aside = lane.spool.set_aside(seg, ".rejected")
        except OSError as err:  # kept in place and retried rather than lost
            log.error("predlog: cannot set aside spool segment %s (%s)", seg.path.name, err)
            lane.failed(e)
            return False
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.error(
            "predlog: ClickHouse refuses spool segment %s for good (%s: %s); %d rows kept as %s, not retried "
            "(docs/predlog.md: a rejected segment)", seg.path.name, why, first[:500], seg.rows, aside
        )  # fmt: skip
        lane.drop(seg.rows, "rejected")
        with self._cond:
            lane.fresh.discard(seg.token)
        return True

    def _insert(self, lane: _Lane, table: pa.Table, token: str) -> None:
        t0 = time.perf_counter()
        lane.sink.insert(table, token)
        if lane.predictions:
            metrics.INSERT_SECONDS.observe(time.perf_counter() - t0)
        lane.succeeded()

    # -- close() and the end ----------------------------------------------------------------
    def _spill_batcher_work(self) -> None:
        """The batcher outlasted close()'s timeout: its claimed batch and the queue go to the spool from here."""
        with self._cond:
            rest = list(self._queue)
            self._queue.clear()
            claimed, self._claimed = self._claimed, None
        if claimed is not None and (table := self._encode(claimed[0])) is not None:
            self._spill(self._rows, table, claimed[1])
        if rest and (table := self._encode(rest)) is not None:
            self._spill(self._rows, table, uuid.uuid4().hex)

    def _spill_sender_work(self) -> None:
        """The sender outlasted close()'s timeout (a sink that hangs): what it holds in memory, the batch
        handed to it and the audit rows that wait, go to the spool from here."""
        with self._cond:
            h, self._handoff = self._handoff, None
        if h is not None:
            if h.lost_as is None:
                self._spill(self._rows, h.table, h.token)
            else:
                self._rows.drop(h.table.num_rows, h.lost_as)
        self._keep_pending_events()
        self._rows.count_fresh_as_spilled()

    def _spill(self, lane: _Lane, table: pa.Table, token: str) -> None:
        """Spool a batch the sink did not take; rows refused by the full policy or lost to a failed write
        (disk full, an unbound spool) are counted."""
        if lane.spool.unbound is not None:  # said once, at start
            lane.drop(table.num_rows, "spool_error")
            return
        try:
            seg, dropped = lane.spool.append(table, token)
        except OSError as e:
            log.error("predlog: spool write failed (%s); %d %s rows dropped", e, table.num_rows, lane.table)
            lane.drop(table.num_rows, "spool_error")
            return
        lane.drop(dropped, "spool_full")
        if seg is not None:
            lane.add("spilled", seg.rows)

    def _ended(self) -> None:
        """A thread ends; the last one releases the sinks and spools if close() stopped waiting for it."""
        with self._cond:
            self._live -= 1
            release = self._live == 0 and self._abandoned
        if release:
            self._release()

    def _release(self) -> None:
        for lane in self._lanes():
            lane.sink.close()
            lane.spool.close()

    def _encode(self, batch: list[PredictionRecord]) -> pa.Table | None:
        try:
            return records_to_arrow(batch)
        except Exception:  # noqa: BLE001 - isolate the bad rows, keep the good ones
            good = []
            for r in batch:
                try:
                    records_to_arrow([r])
                    good.append(r)
                except Exception as e:  # noqa: BLE001
                    log.warning("predlog: dropping an unencodable row (%s)", e)
                    self._drop(1, "invalid")
            return records_to_arrow(good) if good else None

    def _drop(self, n: int, reason: str) -> None:
        self._rows.drop(n, reason)

    def _atexit(self) -> None:
        self.close(timeout=5.0)
