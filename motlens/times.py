"""Times the prediction log can hold and pandas can represent: from 1970 to 2262."""

from __future__ import annotations

from datetime import UTC, datetime

#: nanoseconds since 1970 (the log's DateTime64 and pandas' Timestamp) reach April 2262
EARLIEST, LATEST = datetime(1970, 1, 1, tzinfo=UTC), datetime(2262, 1, 1, tzinfo=UTC)


def parse_time(text: str) -> datetime:
    """ISO-8601 from 1970 to 2262, in UTC (naive times are UTC); ``ValueError`` naming the problem."""
    try:
        ts = datetime.fromisoformat(text.strip())
    except ValueError as e:
        raise ValueError(f"not an ISO-8601 time: {text!r}") from e
    ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    if not EARLIEST <= ts < LATEST:
        raise ValueError(f"time out of range: {text!r} (from {EARLIEST.year} to {LATEST.year})")
    return ts
