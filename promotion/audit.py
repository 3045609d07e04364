"""The audit trail of every promotion action: MLflow version tags, a ``promotion_events`` row, metrics."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from motlens import MODEL_NAME
from promotion.gates import GateResult, gates_json
from promotion.settings import PromoteSettings

log = logging.getLogger(__name__)

TAG_PREFIX = "promotion."
MAX_TAG_VALUE = 5000


@dataclass
class Event:
    """One promotion action (or a refused / held one) with everything the audit needs."""

    action: str
    actor: str
    target: str
    from_version: str = ""
    to_version: str = ""
    from_state: str = ""
    to_state: str = ""
    percent: float = 0.0
    success: bool = True
    refused: bool = False  # not done because a gate or a guard said no (exit 3), not because it failed
    dry_run: bool = False
    reason: str = ""
    gates: list[GateResult] = field(default_factory=list)
    ts: datetime = field(default_factory=lambda: datetime.now(UTC))
    #: more for the row's ``details``: ``partial`` + ``applied_at`` (the target took the change, the
    #: registry did not follow), ``resumes`` (the time of the partial row a re-run finished)
    details: dict[str, Any] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The ``promotion_events`` row (predlog.schema.PROMOTION_EVENTS)."""
        return {
            "ts": self.ts,
            "model_name": MODEL_NAME,
            "action": self.action,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "canary_percent": float(self.percent),
            "target": self.target,
            "actor": self.actor,
            "dry_run": self.dry_run,
            "success": self.success,
            "reason": self.reason,
            "gates": gates_json(self.gates),
            "details": json.dumps(
                {"from": self.from_state, "to": self.to_state}
                | ({"refused": True} if self.refused else {})
                | self.details
            ),
        }

    def tags(self, history_index: int) -> dict[str, str]:
        """Version tags: the latest action in full, plus a numbered compact history entry."""
        when = self.ts.isoformat()
        summary = {
            "action": self.action,
            "actor": self.actor,
            "at": when,
            "from": self.from_state,
            "to": self.to_state,
            "ok": self.success,
            "reason": self.reason,
            "gates": {g.name: g.status for g in self.gates},
        }
        return {
            f"{TAG_PREFIX}last_action": self.action,
            f"{TAG_PREFIX}last_actor": self.actor,
            f"{TAG_PREFIX}last_at": when,
            f"{TAG_PREFIX}last_from": self.from_state,
            f"{TAG_PREFIX}last_to": self.to_state,
            f"{TAG_PREFIX}last_success": str(self.success).lower(),
            f"{TAG_PREFIX}last_reason": self.reason[:MAX_TAG_VALUE],
            f"{TAG_PREFIX}last_gates": gates_json(self.gates)[:MAX_TAG_VALUE],
            f"{TAG_PREFIX}events": str(history_index),
            f"{TAG_PREFIX}event.{history_index:04d}": json.dumps(summary, sort_keys=True)[:MAX_TAG_VALUE],
        }


def tag_version(registry: Any, version: str, event: Event, extra: dict[str, str] | None = None) -> None:
    """Write the event (and ``extra`` state tags) onto the version in the MLflow registry."""
    tags = registry.resolve(version).tags
    index = int(tags.get(f"{TAG_PREFIX}events", "0")) + 1
    registry.set_tags(version, {**event.tags(index), **(extra or {})})


def record_alias_set(
    registry: Any, *, alias: str, version: str, previous: str | None, actor: str, reason: str, run_id: str
) -> list[str]:
    """Audit an alias set outside the promotion workflow (``motlens train --alias``): an ``alias_set``
    event in the version's tags and a ``promotion_events`` row (target ``registry``). No gate ran and
    nothing was deployed: a server following the alias records its own ``follow`` row when it switches.
    Returns what could not be written (empty: the record is complete; the caller says it); never raises."""
    event = Event(
        action="alias_set",
        actor=actor,
        target="registry",
        from_version=previous or "",
        to_version=version,
        from_state=f"alias {alias} → " + (f"v{previous}" if previous else "unset"),
        to_state=f"alias {alias} → v{version}",
        reason=reason,
        details={"alias": alias, "run_id": run_id},
    )
    from motlens.errors import describe  # one line, credentials redacted

    gaps = []
    try:
        tag_version(registry, version, event)
    except Exception as e:  # noqa: BLE001 - the alias stands; the caller reports the gap
        gaps.append(f"version tags: {describe(e)}")
    try:
        import predlog

        reader = predlog.open_reader()
        try:
            reader.insert_promotion_event(event.row())
        finally:
            reader.close()
    except Exception as e:  # noqa: BLE001
        gaps.append(f"promotion_events row: {describe(e)}")
    return gaps


def export_metrics(settings: PromoteSettings, aliases: dict[str, str], canary_percent: float) -> None:
    """``motlens_registry_alias_info``, ``motlens_promotion_last_run_timestamp_seconds`` and
    ``motlens_canary_percent`` to the Pushgateway (when set) or a textfile (when set)."""
    if not settings.pushgateway_url and not settings.textfile:
        return
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway, write_to_textfile

    reg = CollectorRegistry()
    info = Gauge(
        "motlens_registry_alias_info", "Registry alias → version (=1)", ["alias", "version"], registry=reg
    )
    for alias, version in sorted(aliases.items()):
        info.labels(alias=alias, version=version).set(1)
    Gauge(
        "motlens_promotion_last_run_timestamp_seconds", "Last promotion run (unix seconds)", registry=reg
    ).set(time.time())
    Gauge("motlens_canary_percent", "Traffic share of the canary (0 when none)", registry=reg).set(
        canary_percent
    )
    if settings.pushgateway_url:
        push_to_gateway(settings.pushgateway_url, job="motlens-promotion", registry=reg)
    if settings.textfile:
        settings.textfile.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(settings.textfile), reg)
