"""Time windows: durations (``30m``, ``24h``, ``7d``), ISO intervals, and the reference spec."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from motlens.times import EARLIEST, parse_time

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime

    def __str__(self) -> str:
        return f"{self.start.isoformat()}/{self.end.isoformat()}"


MAX_DURATION = timedelta(days=3660)


def parse_duration(text: str) -> timedelta:
    """``90s``, ``30m``, ``24h``, ``7d``, ``2w`` → timedelta (positive)."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 30m, 24h, 7d)")
    try:
        d = timedelta(**{_UNITS[m[2]]: float(m[1])})
    except OverflowError:
        raise ValueError(f"duration too long: {text!r} (at most {MAX_DURATION.days}d)") from None
    if d <= timedelta(0):
        raise ValueError(f"duration must be positive: {text!r}")
    if d > MAX_DURATION:
        raise ValueError(f"duration too long: {text!r} (at most {MAX_DURATION.days}d)")
    return d


def _window_before(stop: datetime, duration: timedelta) -> Window:
    if stop - duration < EARLIEST:
        raise ValueError(f"a window of {duration} ending {stop.isoformat()} starts before {EARLIEST.year}")
    return Window(stop - duration, stop)


def current_window(window: str, end: str | None = None, now: datetime | None = None) -> Window:
    """The window of length ``window`` ending at ``end`` (default now)."""
    stop = parse_time(end) if end else (now or datetime.now(UTC))
    return _window_before(stop, parse_duration(window))


@dataclass(frozen=True)
class ReferenceSpec:
    """Where the reference comes from: the bundle, a log window, or a local file."""

    kind: str  # "bundle" | "window" | "path"
    window: Window | None = None
    path: Path | None = None

    def describe(self) -> str:
        if self.kind == "window":
            return f"window:{self.window}"
        if self.kind == "path":
            return f"path:{self.path}"
        return "bundle"


def reference_spec(text: str, current: Window) -> ReferenceSpec:
    """``bundle`` | a duration before the current window | ``START/END`` | a path that exists."""
    text = text.strip()
    if text == "bundle":
        return ReferenceSpec("bundle")
    if _DURATION.match(text):
        return ReferenceSpec("window", _window_before(current.start, parse_duration(text)))
    if "/" in text and not Path(text).exists():
        a, b = text.split("/", 1)
        try:
            w = Window(parse_time(a), parse_time(b))
        except ValueError as e:
            raise ValueError(f"reference {text!r} is neither a path that exists nor a window START/END ({e})") from e
        if w.end <= w.start:
            raise ValueError(f"reference window ends before it starts: {text!r}")
        return ReferenceSpec("window", w)
    if Path(text).exists():
        return ReferenceSpec("path", path=Path(text))
    raise ValueError(
        f"cannot read reference {text!r}: use 'bundle', a duration (7d), START/END (ISO-8601) "
        "or the path of a bundle directory or Parquet file"
    )
