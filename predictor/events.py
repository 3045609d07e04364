"""Audit rows the server writes itself, one ``promotion_events`` row (target ``serve``) each time it
changes what it serves: ``follow`` (``--follow-alias`` switched production to the version the alias
moved to), ``serve_load`` (a slot loaded a model: at start, through the admin API, a restored canary,
a reference loaded afresh once the registry answered; ``details.fallback`` when it is a last-known-good
bundle), ``serve_fallback_cleared``, ``serve_percent``, ``serve_promote``, ``serve_rollback`` (the
admin API's canary operations, also when a promotion CLI drives them) and ``serve_stop``; and
``serve_refused`` (``success = false``: the version the followed alias names failed its verification,
load or golden check, so the server kept what it served; once per version). So what the server did,
and when, is in the trail beside what the promotion CLI asked for (predictor.slots).

Handed to the server's prediction-log writer (``predlog.writer.PredictionLogWriter.record_event``): it
spools the row at once (fsync'd, ``spool/events/``) and stores it in the log in order, retried while the
log cannot take it (ClickHouse down, disk full), exactly once (its token deduplicates a replay), the same
way as prediction rows; so this never waits on the log, and the wait for a row at shutdown is part of the
writer's close. On ClickHouse the predictor's user needs ``INSERT`` on ``promotion_events``
(docs/deploy.md). Without a writer open on the log (no server in this process) a row is one INSERT (a
Parquet segment embedded), logged when it fails (a warning the first time, then at debug). Never a failure
of serving.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from datetime import UTC, datetime
from typing import Any

from motlens import MODEL_NAME

log = logging.getLogger(__name__)

#: ``promotion_events.target`` of the rows the server writes
TARGET = "serve"

_warned = threading.Event()


def actor() -> str:
    return f"motlens serve@{socket.gethostname()}"


def server_row(
    action: str,
    *,
    slot: str,
    from_version: str | None,
    to_version: str | None,
    percent: float,
    reason: str,
    ts: datetime | None = None,
    success: bool = True,
    **details: Any,
) -> dict:
    """A ``promotion_events`` row of something the server did (``ts``: when it took effect)."""
    return {
        "ts": ts or datetime.now(UTC),
        "model_name": MODEL_NAME,
        "action": action,
        "from_version": from_version or "",
        "to_version": to_version or "",
        "canary_percent": float(percent),
        "target": TARGET,
        "actor": actor(),
        "dry_run": False,
        "success": success,
        "reason": reason,
        "gates": "[]",
        "details": json.dumps({"slot": slot, **details}, default=str),
    }


def follow_row(
    alias: str,
    from_version: str | None,
    to_version: str,
    served_since: datetime,
    ref: str,
    *,
    percent: float,
    replaced_fallback: bool = False,
    reverted_after_s: float | None = None,
) -> dict:
    """The row of a follower switch (``ts``: when the new version started serving; ``percent``: the
    canary's share, which the switch leaves as it was). When it replaced a last-known-good bundle the
    alias did not move then: the registry answered again and named another version. Nor did it when
    ``reverted_after_s`` is given: the admin API had installed ``from_version``, which the alias did not
    come to name within that grace, so the alias's version serves again."""
    reason = f"alias {alias} moved to version {to_version}"
    extra: dict[str, Any] = {}
    if reverted_after_s is not None:
        reason = (
            f"alias {alias} still names version {to_version}: the admin API's version {from_version} was not "
            f"named by it within {reverted_after_s:.0f} s, so the alias leads again"
        )
        extra = {"cause": "admin_grace_expired", "grace_s": reverted_after_s}
    if replaced_fallback:
        reason = (
            f"registry reachable again: alias {alias} names version {to_version}; "
            f"replaced the last-known-good version {from_version}"
        )
    return server_row(
        "follow", slot="production", from_version=from_version, to_version=to_version, percent=percent,
        reason=reason, ts=served_since, ref=ref, replaced_fallback=replaced_fallback, **extra,
    )  # fmt: skip


def refused_row(alias: str, serving: str | None, version: str, ref: str, why: str, *, percent: float) -> dict:
    """The row of a follower switch the server refused (``success = false``): the alias names a version
    that failed its verification, load or golden check; ``serving`` goes on serving."""
    return server_row(
        "serve_refused", slot="production", from_version=serving, to_version=version, percent=percent,
        reason=f"alias {alias} names version {version}, refused: {why}; version {serving or 'none'} serves on",
        success=False, ref=ref,
    )  # fmt: skip


def write_event(settings: Any, row: dict[str, Any]) -> bool:
    """Store one ``promotion_events`` row in the log ``settings`` (a ``PredlogSettings``) names: through the
    writer this process opened with ``settings`` (the server's), else at once; False if it is lost."""
    from predlog.reader import ParquetSource, TableSource
    from predlog.schema import row_to_arrow
    from predlog.writer import writer_of

    if (writer := writer_of(settings)) is not None:
        return writer.record_event(row)
    try:
        data = row_to_arrow("promotion_events", row)
        if settings.embedded:
            ParquetSource(settings.root).insert("promotion_events", data)
        else:
            from predlog.sinks import make_client

            client = make_client(settings)
            try:
                TableSource(client, settings.database).insert("promotion_events", data)
            finally:
                client.close()
    except Exception as e:  # noqa: BLE001 - an audit row must never stop serving
        if not _warned.is_set():
            _warned.set()
            log.warning(
                "cannot write the promotion_events row of a %s (%s: %s); serving goes on. On ClickHouse "
                "the predictor's user needs INSERT on promotion_events (docs/deploy.md)",
                row.get("action"), type(e).__name__, str(e)[:300],
            )  # fmt: skip
        else:
            log.debug("cannot write a promotion_events row: %s", e)
        return False
    return True
