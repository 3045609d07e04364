"""When a canary started and last stepped: its tags, else the audit trail, else a bounded lookback."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from promotion.audit import TAG_PREFIX
from promotion.clock import as_utc, parse_ts, utc_now
from promotion.frames import records
from promotion.settings import PromoteSettings
from promotion.tags import STARTED_AT_TAG, STEP_AT_TAG

log = logging.getLogger(__name__)

_STEP_ACTIONS = ("canary_start", "canary_set", "advance")  # the actions that stamp STEP_AT_TAG
CLOCK_TOLERANCE_S = 60.0  # a recorded time further ahead of this host's clock is clock disagreement
LOOKBACK_S = 3600.0  # the live gate's window when no step time is recorded anywhere (at least the dwell)


@dataclass
class CanaryTimes:
    """The canary's windows: drift reports count from ``started``, live stats from ``since`` (the last
    step). ``source`` says where ``since`` came from when not from ``promotion.step_at``; ``skew`` and
    ``started_skew`` name a recorded time later than this host's now (the windows then fall back as
    if it were missing, and the gates hold unless they fail)."""

    started: datetime
    since: datetime
    source: str = ""
    skew: str = ""
    started_skew: str = ""
    #: how ``started`` was chosen when no start is recorded anywhere (the drift gate's detail says it)
    started_source: str = ""


def canary_times(
    version: str, tags: dict[str, str], reader: Callable[[], Any], settings: PromoteSettings
) -> CanaryTimes:
    """When the canary started and last stepped: its tags ``promotion.canary_started_at`` and
    ``promotion.step_at``; where one is missing, unreadable or later than now (another host's clock),
    the latest such action the audit trail records (the version's event tags, else the
    ``promotion_events`` table), else (no step time at all) the last ``LOOKBACK_S`` (at least the dwell).
    A start found nowhere is the step's time: drift reports of an earlier rollout must not count."""
    now = utc_now()
    started, started_why, started_skew = _tag_time(tags, STARTED_AT_TAG, now)
    step, step_why, skew = _tag_time(tags, STEP_AT_TAG, now)
    if started is not None and step is not None:
        return CanaryTimes(started, step)
    recorded = _recorded_steps(version, tags, now, reader)
    if started is None and "canary_start" in recorded:
        started = recorded["canary_start"][0]
    unstarted = "" if started else f"no start of version {version} recorded: drift reports counted since "
    if step is not None:  # drift reports: since the start, or (unknown) since the step, never all of them
        return CanaryTimes(
            started or step, step, started_skew=started_skew, started_source=unstarted and unstarted + "its last step"
        )
    known = [(started, f"the canary's start ({STARTED_AT_TAG})")] if started and not started_why else []
    if "step" in recorded:
        ts, action, where = recorded["step"]
        known.append((ts, f"the latest step the audit trail records: {action} at {ts.isoformat()} in {where}"))
    if known:
        since, what = max(known, key=lambda k: k[0])
        return CanaryTimes(
            started or since, since, f"{step_why}: counting since {what}", skew, started_skew,
            unstarted and unstarted + "the latest step",
        )  # fmt: skip
    lookback = max(LOOKBACK_S, settings.min_step_interval_s)
    source = (
        f"{step_why} and no step time recorded (no canary_start, canary_set or advance of version "
        f"{version} in the audit trail): counting the last {lookback / 3600:g} h"
    )
    since = now - timedelta(seconds=lookback)
    return CanaryTimes(started or since, since, source, skew, started_skew, unstarted and unstarted + since.isoformat())


def _recorded_steps(
    version: str, tags: dict[str, str], now: datetime, reader: Callable[[], Any]
) -> dict[str, tuple[datetime, str, str]]:
    """The latest successful ``canary_start`` and the latest step (``canary_start``, ``canary_set``,
    ``advance``) of ``version`` the audit trail records, not later than now: (time, action, where)."""
    found: list[tuple[datetime, str, str]] = []
    for key, value in tags.items():
        if not key.startswith(f"{TAG_PREFIX}event."):
            continue
        try:
            entry = json.loads(value)
        except ValueError:
            continue  # a history entry cut at the tag length limit
        ts = parse_ts(entry.get("at")) if isinstance(entry, dict) else None
        if ts and entry.get("ok") and entry.get("action") in _STEP_ACTIONS:
            found.append((ts, str(entry["action"]), f"the version's audit tags ({key})"))
    if not found:
        try:
            rows = records(reader().promotion_events(limit=1000))
        except Exception as e:  # noqa: BLE001 - no audit trail: the lookback applies
            log.warning("could not read promotion_events for the canary's step time: %s", e)
            rows = []
        for r in rows:
            ts = as_utc(r.get("ts"))
            if (
                ts
                and str(r.get("to_version")) == version
                and r.get("action") in _STEP_ACTIONS
                and bool(r.get("success"))
                and not bool(r.get("dry_run"))
            ):
                found.append((ts, str(r["action"]), "the promotion_events table"))
    found = [f for f in found if f[0] <= now + timedelta(seconds=CLOCK_TOLERANCE_S)]
    out: dict[str, tuple[datetime, str, str]] = {}
    if found:
        out["step"] = max(found, key=lambda f: f[0])
    starts = [f for f in found if f[1] == "canary_start"]
    if starts:
        out["canary_start"] = max(starts, key=lambda f: f[0])
    return out


def _tag_time(tags: dict[str, str], name: str, now: datetime) -> tuple[datetime | None, str, str]:
    """(time, why it is unusable, clock-skew message) of the time tag ``name``: the time is None when
    the tag is missing, unreadable or later than now beyond :data:`CLOCK_TOLERANCE_S`."""
    raw = tags.get(name)
    if not raw:
        return None, f"{name} missing", ""
    ts = parse_ts(raw)
    if ts is None:
        return None, f"{name} unreadable ({raw!r})", ""
    ahead = (ts - now).total_seconds()
    if ahead > CLOCK_TOLERANCE_S:
        skew = (
            f"clock skew: {name} {raw} is later than now ({now.isoformat()}) by {ahead:.0f} s — the clock of "
            "the host that wrote it runs ahead, or this host's runs behind; holding until the clocks agree "
            "(fix the clock, or re-stamp the step with `motlens promote canary set N` at the current share)"
        )
        return None, f"{name} in the future", skew
    return ts, "", ""
