"""What ``motlens promote status`` reads: aliases and versions, live state, disagreements, drift, live stats, events."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from motlens import MODEL_NAME
from motlens.credentials import redact
from promotion.clock import utc_now
from promotion.frames import records
from promotion.rollout import RolloutError
from promotion.tags import STATUS_TAG, VERDICTS
from promotion.targets import TargetError

if TYPE_CHECKING:
    from promotion.workflow import Promoter


def read_status(promoter: Promoter) -> dict[str, Any]:
    """Registry aliases and versions, live state, disagreements, drift verdicts, live stats, events. Each
    source is read on its own, so one that cannot be read leaves the others shown: the target
    (``live`` None, ``live_error``), the registry (``aliases`` and ``versions`` None, ``registry_error``;
    tags and any interrupted change unknown), the prediction log (``predlog_error``)."""
    from training.registry import RegistryError

    out: dict[str, Any] = {"target": promoter.target.describe(), "pins_digest": promoter.target.pins_digest}
    try:
        live = promoter.target.read()
    except (TargetError, RolloutError) as e:
        out["live"], out["live_error"] = None, str(e)
        live = None
    if live is not None:
        out["live"] = {**live.__dict__, "summary": live.describe()}
    aliases: dict[str, str] | None = None
    intent = None
    try:
        aliases = promoter.registry.aliases()
        listed = promoter.registry.versions(limit=10)
        intent = promoter.read_intent()
    except RegistryError as e:
        out["aliases"] = out["versions"] = aliases = None
        out["registry_error"] = registry_problem(promoter, e)
    else:
        out["aliases"] = aliases
        out["versions"] = [
            {
                "version": v.version,
                "aliases": v.aliases,
                "status": v.tags.get(STATUS_TAG, ""),
                "created_at": v.created_at.isoformat() if v.created_at else None,
                "last_action": v.tags.get("promotion.last_action", ""),
                "metrics": {m: v.metrics[m] for m in promoter.settings.offline_metrics if m in v.metrics},
            }
            for v in listed
        ]
        out["tag_disagreements"] = tag_disagreements(promoter, aliases, out["versions"])
    if live is not None and aliases is not None:
        out["disagreements"] = promoter.disagreements(live, aliases)
    if intent and aliases is not None:  # a run that stopped before its audit: what the next command does
        outlook = promoter.intent_outlook(intent, live, aliases)[0] if live is not None else "unknown"
        out["interrupted"] = {**{k: intent[k] for k in ("action", "at", "actor", "from", "to")}, "next": outlook}
        if outlook == "changed" and (reverted := promoter.follower_reverted(intent, aliases)):
            out["interrupted"]["reverted"] = f"the server's alias follower reverted it {reverted}"
    known = aliases or {}
    versions = {
        v
        for v in (
            known.get("production"),
            known.get("canary"),
            live and live.canary_version,
            live and live.production_version,
        )
        if v
    }
    try:
        reader = promoter.reader()
        out["drift"] = [r for v in sorted(versions) for r in records(reader.drift_reports(model_version=v, limit=1))]
        canary = live.canary_version if live else None
        times = promoter.evidence.canary_times(canary) if canary and aliases is not None else None
        since = times.since if times else _hours_ago(1)
        out["live_stats_since"] = since.isoformat()
        notes = [n for n in (times.skew, times.started_skew, times.source) if n] if times else []
        if canary and aliases is None:
            notes.append("the canary's start is in the registry, which could not be read: the last hour")
        if notes:
            out["live_stats_note"] = "; ".join(notes)
        out["live_stats"] = records(reader.live_stats(since=since, model_name=MODEL_NAME))
        out["live_requests"] = [  # what the live gate counts: requests, not rows (arrays left out)
            {k: v for k, v in r.items() if not k.endswith(("latencies", "miss_pair_texts"))}
            for r in records(reader.live_requests(since=since, model_name=MODEL_NAME))
        ]
        out["events"] = records(reader.promotion_events(limit=EVENTS_SHOWN))
    except Exception as e:  # noqa: BLE001 - status shows what it can
        out["predlog_error"] = str(e)
    return out


def registry_problem(promoter: Promoter, e: Exception) -> str:
    """Why the registry could not be read, naming it by its URI without credentials."""
    from training.registry import RegistryUnreachable

    kind = "unreachable" if isinstance(e, RegistryUnreachable) else "unreadable"
    return redact(f"{kind} ({promoter.registry.tracking_uri}): {e}")


def tag_disagreements(promoter: Promoter, aliases: dict[str, str], versions: list[dict[str, Any]]) -> list[str]:
    """Where the versions' ``promotion.status`` tags and the aliases tell different stories: an alias
    moved outside motlens (a server following it serves that version) leaves the tags as the last
    promotion set them, so "which version is production" would read differently by tag and by alias."""
    out = []
    production, canary = aliases.get("production"), aliases.get("canary")
    if production:
        status = promoter.info(production).tags.get(STATUS_TAG, "")
        if status and status != "production":
            out.append(
                f"alias production names version {production}, tagged {STATUS_TAG}={status}: "
                "moved outside motlens? (a server following it serves it; see its follow event)"
            )
    if canary and (status := promoter.info(canary).tags.get(STATUS_TAG, "")) in VERDICTS:
        out.append(f"alias canary names version {canary}, tagged {STATUS_TAG}={status}")
    out += [
        f"version {v['version']} is tagged {STATUS_TAG}=production, but alias production names "
        f"{f'version {production}' if production else 'no version'}"
        for v in versions
        if v["status"] == "production" and v["version"] != production
    ]
    return out


#: the newest ``promotion_events`` rows ``status`` lists: the CLI's and the servers' (a local-target
#: step is one CLI row and a server row or two)
EVENTS_SHOWN = 10


def _hours_ago(h: float) -> datetime:
    return utc_now() - timedelta(hours=h)
