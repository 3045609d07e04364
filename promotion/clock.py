"""UTC times: this host's clock, and times read from tags and ``promotion_events`` rows."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def utc_now() -> datetime:
    return datetime.now(UTC)


def parse_ts(s: str | None) -> datetime | None:
    """An ISO time from a tag; a naive one is UTC (as everywhere in motlens), an unreadable one None."""
    if not s:
        return None
    try:
        ts = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


def as_utc(ts: Any) -> datetime | None:
    """A ``promotion_events`` time (a pandas Timestamp, a datetime or a string) as an aware UTC datetime."""
    if ts is None:
        return None
    if hasattr(ts, "to_pydatetime"):
        ts = ts.to_pydatetime()
    if isinstance(ts, str):
        return parse_ts(ts)
    if not isinstance(ts, datetime):
        return None
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
