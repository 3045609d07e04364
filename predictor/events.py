"""Audit rows the server writes itself: a ``promotion_events`` row (action ``follow``) each time
``--follow-alias`` switches production to the version the alias moved to (predictor.slots).

Written through the prediction log's table machinery (predlog.reader's sources, the same path as the
promotion CLI's rows): a Parquet segment under the embedded log, or one INSERT on ClickHouse, whose
predictor user then needs ``INSERT`` on ``promotion_events`` (docs/deploy.md). A row that cannot be
written is logged (a warning the first time, then at debug), never a failure of serving.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from datetime import datetime
from typing import Any

from motlens import MODEL_NAME

log = logging.getLogger(__name__)

#: ``promotion_events.target`` of the rows the server writes
TARGET = "serve"

_warned = threading.Event()


def actor() -> str:
    return f"motlens serve@{socket.gethostname()}"


def follow_row(alias: str, from_version: str | None, to_version: str, served_since: datetime, ref: str) -> dict:
    """The ``promotion_events`` row of a follower switch (``ts``: when the new version started serving)."""
    return {
        "ts": served_since,
        "model_name": MODEL_NAME,
        "action": "follow",
        "from_version": from_version or "",
        "to_version": to_version,
        "canary_percent": 0.0,
        "target": TARGET,
        "actor": actor(),
        "dry_run": False,
        "success": True,
        "reason": f"alias {alias} moved to version {to_version}",
        "gates": "[]",
        "details": json.dumps({"slot": "production", "ref": ref}),
    }


def write_event(settings: Any, row: dict[str, Any]) -> bool:
    """Store one ``promotion_events`` row in the log ``settings`` (a ``PredlogSettings``) names; False
    (and a warning, once per process) if it could not be stored."""
    from predlog.reader import ParquetSource, TableSource
    from predlog.schema import row_to_arrow

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
                "cannot write the promotion_events row of a %s switch (%s: %s); serving goes on. On ClickHouse "
                "the predictor's user needs INSERT on promotion_events (docs/deploy.md)",
                row.get("action"), type(e).__name__, str(e)[:300],
            )  # fmt: skip
        else:
            log.debug("cannot write a promotion_events row: %s", e)
        return False
    return True
