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
    (``live`` None, ``live_error``), the registry (``registry_error``; ``aliases`` and ``versions`` None
    when not even they could be read, and ``tag_disagreements``, ``disagreements`` and any interrupted
    change then unknown: left out), the prediction log (``predlog_error``)."""
    from promotion.workflow import PromotionError
    from training.registry import RegistryError

    out: dict[str, Any] = {"target": promoter.target.describe(), "pins_digest": promoter.target.pins_digest}
    try:
        live = promoter.target.read()
    except (TargetError, RolloutError) as e:
        out["live"], out["live_error"] = None, str(e)
        live = None
    if live is not None:
        out["live"] = {**live.__dict__, "summary": live.describe()}
        if promoter.target.name == "k8s":
            from promotion.overlay_sync import overlay_status

            out["overlay"] = overlay_status(promoter.settings, live)
    aliases: dict[str, str] | None = None
    out["aliases"] = out["versions"] = None
    try:  # every registry read, so one failing part-way leaves what was read shown and the registry named
        aliases = promoter.registry.aliases()
        listed = promoter.registry.versions(limit=10)
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
        intent = promoter.read_intent()
        for version in filter(None, (aliases.get("production"), aliases.get("canary"))):
            promoter.uri(version)  # read (and kept) now: disagreements() takes an unreadable one for a mismatch
        out["tag_disagreements"] = tag_disagreements(promoter, aliases, out["versions"])
    except (RegistryError, PromotionError) as e:
        out["registry_error"] = registry_problem(promoter, e)
    else:
        if live is not None:
            out["disagreements"] = promoter.disagreements(live, aliases)
        if intent:  # a run that stopped before its audit: what the next command does
            outlook = promoter.intent_outlook(intent, live, aliases)[0] if live is not None else "unknown"
            out["interrupted"] = {**{k: intent[k] for k in ("action", "at", "actor", "from", "to")}, "next": outlook}
            if outlook == "changed" and live and (reverted := promoter.follower_reverted(intent, live, aliases)):
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
        times = None
        if canary and "registry_error" not in out:
            try:
                times = promoter.evidence.canary_times(canary)
            except PromotionError as e:  # its start is a registry tag
                out["registry_error"] = registry_problem(promoter, e)
        since = times.since if times else _hours_ago(1)
        out["live_stats_since"] = since.isoformat()
        notes = [n for n in (times.skew, times.started_skew, times.source) if n] if times else []
        if canary and times is None:
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
        from motlens.errors import describe

        out["predlog_error"] = describe(e)  # a bad MOTLENS_PREDLOG_* by its variable, on one line
    return out


def registry_problem(promoter: Promoter, e: Exception) -> str:
    """Why the registry could not be read, naming it by its URI without credentials."""
    from training.registry import RegistryUnreachable

    unreachable = isinstance(e, RegistryUnreachable) or isinstance(e.__cause__, RegistryUnreachable)  # promoter.info's
    kind = "unreachable" if unreachable else "unreadable"
    # redacted apart: a credential's value in the URI's query runs to the next space
    return f"{kind} ({redact(promoter.registry.tracking_uri)}): {redact(str(e))}"


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
