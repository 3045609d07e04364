"""The prediction-log writer the predictor uses: never blocks, never raises, loses nothing it can keep.

``submit`` appends to a bounded in-memory queue (full → ``dropped{reason="queue_full"}``). A
background thread takes batches of ``batch_rows`` (or whatever arrived within
``settings.flush_interval``: 1 s to ClickHouse, 10 s for the embedded log unless set) and stores them:

* remote sink (ClickHouse): the batch is first written to the spool (fsync'd Arrow IPC segment,
  a write-ahead copy), then the spool is drained in order into the sink with the segment's
  token as ``insert_deduplication_token`` and each stored segment is removed. A failed insert
  leaves the segment (``rows_spilled``) and retries with exponential backoff; later batches
  queue behind it, so replay keeps order and stores each row exactly once. A segment ClickHouse
  refuses for good (a schema or type error, ``predlog.sinks.PERMANENT_CODES``) is set aside as
  ``*.rejected`` (kept, counted as ``dropped{reason="rejected"}``) and the ones behind it go on; an
  error of a materialized view on the table is retried (the rows are stored; the token deduplicates).
* local Parquet sink: batches go straight to Parquet; only a failed write goes to the spool.

``close`` (called on SIGTERM) drains the queue, tries the sink once more and leaves whatever
the sink did not take in the spool for the next start.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from predlog import metrics
from predlog.migrate import SchemaError
from predlog.records import PredictionRecord
from predlog.schema import records_to_arrow
from predlog.settings import PredlogSettings
from predlog.sinks import Sink, permanent_error
from predlog.spool import Segment, Spool

log = logging.getLogger(__name__)


class PredictionLogWriter:
    """Background batching writer; see the module docstring for the delivery guarantees."""

    def __init__(self, sink: Sink, spool: Spool, settings: PredlogSettings):
        self.sink = sink
        self.spool = spool
        self.settings = settings
        self._queue: deque[PredictionRecord] = deque()
        self._cond = threading.Condition()
        self._inflight = 0
        self._closed = False
        self._stopping = False
        #: close() gave up on the thread (``_abandoned``): whichever of the two finishes last releases
        #: the sink and the spool (its lock)
        self._abandoned = False
        self._finished = False
        self._flush_requested = False
        self._counts = {"written": 0, "spilled": 0, "replayed": 0}
        self._dropped: dict[str, int] = {}
        self._fresh: set[str] = set()
        #: an embedded sink's batch being inserted (it has no write-ahead copy): close() spills it
        #: if the insert outlasts the timeout; a replay of the same token rewrites the same file
        self._unspooled: tuple[pa.Table, str] | None = None
        #: the batch the thread took off the queue, until it is in the spool or the sink (or handed on
        #: as ``_unspooled``): close() spills it if the thread outlasts the timeout; both writes carry
        #: the batch's token, so a copy written twice is stored once
        self._claimed: tuple[list[PredictionRecord], str] | None = None
        self._retry_at = 0.0
        self._backoff = settings.retry_initial_s
        self._sink_ok = True
        metrics.SPOOL_HELD_ROWS.set(spool.held_rows)
        #: the embedded log's background compaction (set by ``open_writer``), stopped by close()
        self.compactor: Any = None
        self._thread = threading.Thread(target=self._run, name="predlog-writer", daemon=True)
        self._thread.start()
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

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every row submitted so far is in the sink or the spool; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._flush_requested = True
            self._cond.notify_all()
            while self._queue or self._inflight:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._thread.is_alive():
                    return False
                self._cond.wait(remaining)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Flush, try the sink once more, stop; rows the sink did not take stay in the spool. The writer
        has ``timeout`` seconds; the compactor (stopped first) is waited for only with what is left."""
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
        release = True
        if self._thread.is_alive():  # the sink hangs: keep what is still queued on local disk
            with self._cond:
                rest = list(self._queue)
                self._queue.clear()
            if (unspooled := self._take_unspooled()) is not None:
                self._spill(*unspooled)
            if (claimed := self._take_claimed()) is not None and (table := self._encode(claimed[0])) is not None:
                self._spill(table, claimed[1])
            if rest:
                table = self._encode(rest)
                if table is not None:
                    self._spill(table, uuid.uuid4().hex)
            log.warning("predlog: writer did not stop within %.1fs; queued rows kept in the spool", timeout)
            with self._cond:
                self._abandoned = True
                release = self._finished  # else the thread releases them when the sink lets it go
        if self.compactor is not None:  # a daemon thread; a merge cut short is finished by the next run
            self.compactor.close(max(0.0, deadline - time.monotonic()))
        if release:
            self._release()
        metrics.QUEUE_DEPTH.set(0)

    def _release(self) -> None:
        self.sink.close()
        self.spool.close()

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                **self._counts,
                "dropped": sum(self._dropped.values()),
                "dropped_by_reason": dict(self._dropped),
                "queue_depth": len(self._queue),
                "spool_rows": self.spool.rows,
                "spool_bytes": self.spool.bytes,
                "spool_segments": len(self.spool.segments()),
                "spool_held_rows": self.spool.held_rows,
                "sink_ok": self._sink_ok,
            }

    # -- background thread ------------------------------------------------------------------
    def _run(self) -> None:
        self._prepare()
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
                    self._deliver(batch, self._claimed[1])  # type: ignore[index]
                self._drain(force=stop)
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
                with self._cond:
                    self._finished = True
                    abandoned = self._abandoned
                if abandoned:  # close() timed out and left the spool's lock to this thread
                    self._release()
                return

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

    def _deliver(self, batch: list[PredictionRecord], token: str) -> None:
        table = self._encode(batch)
        if table is None or not self._owns(token):  # not owned: close() spilled it meanwhile
            return
        if self.sink.local:
            if not self.spool.segments():  # spooled batches go first
                with self._cond:
                    if self._claimed is None:
                        return
                    self._claimed, self._unspooled = None, (table, token)
                inserted = self._try_insert(table, token)
                with self._cond:
                    if self._unspooled is None or inserted:  # None: close() spilled it meanwhile
                        self._unspooled = None
                        return
                    self._unspooled, self._claimed = None, (batch, token)  # close()'s again until spilled
            self._spill(table, token)
            self._release_claim(token)
            return
        if self.spool.unbound is not None:  # not bound this run (said once, at start): no write-ahead copy
            seg, dropped, reason = None, 0, "spool_error"
        else:
            try:
                seg, dropped = self.spool.append(table, token)  # write-ahead copy
            except OSError as e:
                log.error("predlog: spool write failed (%s); inserting the batch without a write-ahead copy", e)
                seg, dropped, reason = None, 0, "spool_error"
            else:
                reason = "spool_full"
        if seg is not None:
            self._release_claim(token)  # in the spool: close() must not spool it again
            self._drop(dropped, "spool_full")  # older segments, under drop_oldest
            self._fresh.add(token)
            return
        # no durable copy (disk full, or a batch the spool refuses): straight to a healthy sink
        if not (time.monotonic() >= self._retry_at and self._try_insert(table, token)):
            self._drop(table.num_rows, reason)

    def _try_insert(self, table: pa.Table, token: str) -> bool:
        """Insert now; on failure note it (backoff, or ``rejected`` when no retry would pass) and say so."""
        try:
            self._insert(table, token)
        except Exception as e:  # noqa: BLE001
            if (why := permanent_error(e)) is not None:
                log.error("predlog: ClickHouse refuses a batch for good (%s); %d rows dropped", why, table.num_rows)
                self._drop(table.num_rows, "rejected")
                return True  # handled: not the caller's to spill or count again
            self._sink_failed(e)
            return False
        self._add("written", table.num_rows)
        return True

    def _release_claim(self, token: str) -> None:
        """The batch is in the spool (or the sink): no longer close()'s to spill."""
        with self._cond:
            if self._claimed is not None and self._claimed[1] == token:
                self._claimed = None

    def _owns(self, token: str) -> bool:
        with self._cond:
            return self._claimed is not None and self._claimed[1] == token

    def _take_claimed(self) -> tuple[list[PredictionRecord], str] | None:
        with self._cond:
            claimed, self._claimed = self._claimed, None
        return claimed

    def _take_unspooled(self) -> tuple[pa.Table, str] | None:
        """The embedded store's batch in flight, taken by whoever spills it (close() or the writer)."""
        with self._cond:
            pending, self._unspooled = self._unspooled, None
        return pending

    def _drain(self, force: bool = False) -> None:
        """Replay spooled segments in order until one fails (skipped while backing off)."""
        if not force and time.monotonic() < self._retry_at:
            self._count_fresh_as_spilled()
            return
        for seg in self.spool.segments():
            try:
                table = Spool.read(seg)
            except Exception:  # noqa: BLE001 - a corrupt segment must not block the rest
                log.exception("predlog: unreadable spool segment %s set aside", seg.path.name)
                self.spool.set_aside(seg)
                self._drop(seg.rows, "invalid")
                continue
            try:
                self._insert(table, seg.token)
            except Exception as e:  # noqa: BLE001
                if (why := permanent_error(e)) is None:
                    self._sink_failed(e)
                    break
                self._reject(seg, why, e)
                continue
            self.spool.remove(seg)
            self._add("written", seg.rows)
            if seg.token not in self._fresh:
                self._add("replayed", seg.rows)
            self._fresh.discard(seg.token)
        self._count_fresh_as_spilled()

    def _reject(self, seg: Segment, why: str, e: Exception) -> None:
        """A segment ClickHouse refuses for good (``PERMANENT_CODES``) leaves the spool as ``*.rejected``
        (kept, never replayed) so the batches behind it go on; its rows count as ``rejected``."""
        try:
            aside = self.spool.set_aside(seg, ".rejected")
        except OSError as err:  # kept in place and retried rather than lost
            log.error("predlog: cannot set aside spool segment %s (%s)", seg.path.name, err)
            self._sink_failed(e)
            return
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.error(
            "predlog: ClickHouse refuses spool segment %s for good (%s: %s); %d rows kept as %s, not retried "
            "(docs/predlog.md: a rejected segment)", seg.path.name, why, first[:500], seg.rows, aside
        )  # fmt: skip
        self._drop(seg.rows, "rejected")
        self._fresh.discard(seg.token)

    def _count_fresh_as_spilled(self) -> None:
        if self._fresh:
            left = {s.token: s for s in self.spool.segments()}
            for token in self._fresh:
                seg: Segment | None = left.get(token)
                if seg is not None:
                    self._add("spilled", seg.rows)
            self._fresh.clear()

    def _insert(self, table: pa.Table, token: str) -> None:
        t0 = time.perf_counter()
        self.sink.insert(table, token)
        metrics.INSERT_SECONDS.observe(time.perf_counter() - t0)
        if not self._sink_ok:
            log.info("predlog: sink is back; replaying the spool")
        self._sink_ok = True
        self._backoff = self.settings.retry_initial_s
        self._retry_at = 0.0

    def _sink_failed(self, e: Exception) -> None:
        if self._sink_ok:
            log.warning("predlog: sink insert failed (%s: %s); spooling and retrying", type(e).__name__, e)
        self._sink_ok = False
        self._retry_at = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.settings.retry_max_s)

    def _spill(self, table: pa.Table, token: str) -> None:
        seg = self._spool_append(table, token)
        if seg is not None:
            self._add("spilled", seg.rows)

    def _spool_append(self, table: pa.Table, token: str) -> Segment | None:
        """Spool a batch; rows refused by the full policy or lost to a failed write (disk full) are counted."""
        try:
            seg, dropped = self.spool.append(table, token)
        except OSError as e:
            log.error("predlog: spool write failed (%s); %d rows dropped", e, table.num_rows)
            self._drop(table.num_rows, "spool_error")
            return None
        self._drop(dropped, "spool_full")
        return seg

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

    def _add(self, key: str, n: int) -> None:
        with self._cond:
            self._counts[key] += n
        {"written": metrics.ROWS_WRITTEN, "spilled": metrics.ROWS_SPILLED, "replayed": metrics.ROWS_REPLAYED}[key].inc(
            n
        )

    def _drop(self, n: int, reason: str) -> None:
        if n <= 0:
            return
        with self._cond:
            self._dropped[reason] = self._dropped.get(reason, 0) + n
        metrics.ROWS_DROPPED.labels(reason=reason).inc(n)

    def _atexit(self) -> None:
        self.close(timeout=5.0)
