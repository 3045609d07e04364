"""Prometheus series of the prediction-log writer (names fixed by docs/architecture.md "Metrics").

prometheus-client comes with the serve/drift/promote extras; without it the series are no-ops.
"""

from __future__ import annotations

from typing import Any


class _Noop:
    def labels(self, *a: Any, **k: Any) -> _Noop:
        return self

    def inc(self, *a: Any) -> None: ...

    def set(self, *a: Any) -> None: ...

    def observe(self, *a: Any) -> None: ...


ROWS_WRITTEN: Any
ROWS_SPILLED: Any
ROWS_REPLAYED: Any
ROWS_DROPPED: Any
QUEUE_DEPTH: Any
SPOOL_BYTES: Any
SPOOL_HELD_ROWS: Any
INSERT_SECONDS: Any
COLUMNS_DROPPED: Any
EVENTS_DROPPED: Any
#: every reason the writer drops rows for (``Writer._drop``), each exported at 0 from import: a reason
#: first created by its drop would be first scraped already holding the burst, which increase() (and
#: so MotlensPredlogDropping) never counts
DROP_REASONS = ("queue_full", "spool_full", "spool_error", "closed", "invalid", "rejected")
try:
    from prometheus_client import Counter, Gauge, Histogram
except ImportError:  # pragma: no cover - core install without prometheus-client
    ROWS_WRITTEN = ROWS_SPILLED = ROWS_REPLAYED = ROWS_DROPPED = _Noop()
    QUEUE_DEPTH = SPOOL_BYTES = SPOOL_HELD_ROWS = INSERT_SECONDS = COLUMNS_DROPPED = EVENTS_DROPPED = _Noop()
else:
    ROWS_WRITTEN = Counter("motlens_predlog_rows_written_total", "Prediction rows stored in the sink")
    ROWS_SPILLED = Counter("motlens_predlog_rows_spilled_total", "Rows kept in the local spool after a failed insert")
    ROWS_REPLAYED = Counter("motlens_predlog_rows_replayed_total", "Spooled rows later stored in the sink")
    ROWS_DROPPED = Counter(
        "motlens_predlog_rows_dropped_total",
        f"Rows lost, by reason ({', '.join(DROP_REASONS)})",
        ["reason"],
    )
    EVENTS_DROPPED = Counter(
        "motlens_predlog_events_dropped_total",
        "Audit rows (promotion_events) the server could neither spool nor store, by reason",
        ["reason"],
    )
    for _reason in DROP_REASONS:
        ROWS_DROPPED.labels(reason=_reason)
        EVENTS_DROPPED.labels(reason=_reason)
    COLUMNS_DROPPED = Counter(
        "motlens_predlog_columns_dropped_total",
        "Rows inserted without a column the ClickHouse table lacks (a newer writer's spooled batch), by column",
        ["column"],
    )
    QUEUE_DEPTH = Gauge("motlens_predlog_queue_depth", "Rows waiting in the writer's in-memory queue")
    SPOOL_BYTES = Gauge("motlens_predlog_spool_bytes", "Bytes of spooled segments awaiting replay")
    SPOOL_HELD_ROWS = Gauge(
        "motlens_predlog_spool_held_rows",
        "Spooled rows kept for another sink (spool/held/): in no log this writer's readers see",
    )
    INSERT_SECONDS = Histogram(
        "motlens_predlog_insert_seconds",
        "Duration of one batch insert into the sink",
        buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
    )
