"""The promotion workflow: candidate → canary → production, gated, audited, and safe to re-run.

Every action reads the live state first and compares it with the registry. Changes are ordered
live target first, then registry aliases and tags, then the audit row, and each part is
idempotent: if any part fails, ``status`` shows the disagreement and re-running the same command
finishes it (the guard accepts a disagreement that the command itself would resolve).
"""

from __future__ import annotations

import hashlib
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta
from typing import Any

from motlens import MODEL_NAME
from predictor.events import TARGET as SERVE_TARGET
from promotion import gates as g
from promotion.audit import Event, export_metrics, tag_version
from promotion.clock import as_utc, parse_ts, utc_now
from promotion.evidence import Evidence
from promotion.locking import LockBusy
from promotion.rollout import RolloutError, RolloutState, check_percent
from promotion.settings import PromoteSettings
from promotion.tags import (
    INTENT_TAG,
    PERCENT_TAG,
    PREVIOUS_TAG,
    STARTED_AT_TAG,
    STATUS_TAG,
    STEP_AT_TAG,
    VERDICTS,
)
from promotion.targets import Target, TargetUnavailable

log = logging.getLogger(__name__)

_APPLIED_AT = "@applied"  # a tag value stamped with the time the live change took effect


class PromotionError(Exception):
    """Bad input or an impossible request; nothing was changed."""


class Refused(PromotionError):
    """A guard (live vs registry, gates) refused the step; ``--force`` overrides."""


class PartlyDone(Exception):
    """An action failed after the target had already changed; re-running the command finishes it."""


@dataclass
class Outcome:
    action: str
    message: str
    changed: bool = False
    gates: list[g.GateResult] = field(default_factory=list)
    patches: list[Any] = field(default_factory=list)
    audit_ok: bool = True


class Promoter:
    """Drives one target against the registry, gated by ``evidence``; ``dry_run`` prints patches and
    changes nothing."""

    def __init__(
        self,
        settings: PromoteSettings,
        registry: Any,
        target: Target,
        *,
        reader_factory: Callable[[], Any] | None = None,
        golden_check: Callable[[str], tuple[bool, float, str]] | None = None,
        dry_run: bool = False,
        force: bool = False,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.target = target
        self.dry_run = dry_run
        self.force = force
        self._reader_factory = reader_factory
        self._reader: Any = None
        self.evidence = Evidence(settings, registry, self.info, self.reader, golden_check=golden_check, dry_run=dry_run)
        self._uris: dict[str, str] = {}
        self._locked = False

    # ------------------------------------------------------------------ reading

    def reader(self) -> Any:
        if self._reader is None:
            if self._reader_factory is None:
                import predlog

                self._reader = predlog.open_reader()
            else:
                self._reader = self._reader_factory()
        return self._reader

    def info(self, version: str) -> Any:
        from training.registry import RegistryError

        try:
            return self.registry.resolve(str(version))
        except RegistryError as e:
            raise PromotionError(str(e)) from e

    def uri(self, version: str) -> str:
        if version not in self._uris:
            self._uris[version] = self.target.uri_for(version, self.info(version).artifact_uri)
        return self._uris[version]

    def digest(self, version: str) -> str | None:
        """The bundle digest the target is to pin for ``version``: its registry tag, when the target
        pins digests (a local server fetches through the registry, which checks the tag itself)."""
        if not self.target.pins_digest:
            return None
        from training.registry import DIGEST_TAG

        found = self.info(version).tags.get(DIGEST_TAG)
        if not found:
            log.warning(
                "version %s has no %s tag: the target does not pin its bundle (`motlens train pin %s` records it)",
                version,
                DIGEST_TAG,
                version,
            )
        return found

    def snapshot(self) -> tuple[RolloutState, dict[str, str]]:
        """The live state (read first: a ``kubectl edit`` is respected) and the registry aliases."""
        live = self.target.read()
        return live, self.registry.aliases()

    def _settled_snapshot(self) -> tuple[RolloutState, dict[str, str]]:
        """:meth:`snapshot` for a change: refused while the target loads a model (a restarting server
        restores its canary, say), as its state is in flux; ``--force`` proceeds."""
        live, aliases = self.snapshot()
        if live.loading and not self.force:
            raise TargetUnavailable(
                f"{self.target.describe()} is busy ({live.loading}) and its state is about to change: "
                "retry once it has finished (`motlens promote status` shows it)"
            )
        return live, aliases

    def disagreements(self, live: RolloutState, aliases: dict[str, str]) -> list[str]:
        """How the live state and the registry aliases disagree (empty when they agree)."""
        out = []
        prod, canary = aliases.get("production"), aliases.get("canary")
        if live.production_version != prod:
            out.append(
                f"live production is version {live.production_version or '(unknown)'} but the registry's "
                f"'production' alias is {prod or '(unset)'}"
            )
        elif prod and live.serving_production_uri != self._uri_or_none(prod):
            out.append(
                f"live production storage URI {live.serving_production_uri} is not the artifact URI "
                f"of version {prod} ({self._uri_or_none(prod)})"
            )
        elif prod and (found := self._other_pin(live.serving_production_sha256, prod)):
            out.append(f"live production {found}")
        if live.canary_version != canary:
            out.append(
                f"live canary is version {live.canary_version or '(none)'} but the registry's "
                f"'canary' alias is {canary or '(unset)'}"
            )
        elif canary and live.storage_uri != self._uri_or_none(canary):
            out.append(
                f"live canary storage URI {live.storage_uri} is not the artifact URI of version {canary} "
                f"({self._uri_or_none(canary)})"
            )
        elif canary and (found := self._other_pin(live.bundle_sha256, canary)):
            out.append(f"live canary {found}")
        return out

    def _uri_or_none(self, version: str) -> str | None:
        try:
            return self.uri(version)
        except PromotionError:
            return None

    def _other_pin(self, pinned: str | None, version: str) -> str | None:
        """How a pinned bundle digest differs from ``version``'s registry tag (None when it does not,
        or when either is missing: an unpinned revision is shown by ``status``, not refused)."""
        if pinned is None:
            return None
        try:
            expected = self.digest(version)
        except PromotionError:
            return None
        if expected is None or expected == pinned:
            return None
        return f"pins bundle digest {pinned}, not the {expected} registered for version {version}"

    # ------------------------------------------------------------------ execution

    @contextmanager
    def locked(self, *, blocking: bool = True) -> Iterator[None]:
        if self._locked or self.dry_run:
            yield
            return
        with self.target.lock(blocking=blocking):
            self._locked = True
            try:
                yield
            finally:
                self._locked = False

    def _guard(
        self,
        live: RolloutState,
        aliases: dict[str, str],
        desired: RolloutState,
        desired_aliases: dict[str, str],
        event: Event,
    ) -> None:
        """Refuse (exit 3, recorded as ``event`` refused) a change while the live state disagrees with
        the registry, unless the change finishes an interrupted one or ``--force`` is given."""
        problems = self.disagreements(live, aliases)
        if not problems:
            return
        if not self.disagreements(live, desired_aliases) or not self.disagreements(desired, aliases):
            log.warning("resuming an interrupted change: %s", "; ".join(problems))
            return
        if self.force:
            log.warning("--force: proceeding although %s", "; ".join(problems))
            return
        reverted = self._reverted_interrupted(live, aliases)
        self._record_refusal(
            event, live, _join("the live state disagrees with the registry: " + "; ".join(problems), reverted)
        )
        if reverted:
            raise Refused(
                "the live state disagrees with the registry:\n  - " + "\n  - ".join(problems) + f"\n{reverted}"
            )
        if live.not_ready:
            raise Refused(
                f"the live state disagrees with the registry, and {self.target.describe()} is not ready "
                f"({live.not_ready}):\n  - "
                + "\n  - ".join(problems)
                + "\nretry once it is ready; if it cannot load its model, fix that first (its log says why) "
                "or re-run with --force to proceed on the state it reports"
            )
        raise Refused(
            "the live state disagrees with the registry (a manual edit, or an interrupted change):\n  - "
            + "\n  - ".join(problems)
            + "\nfix the live state or the aliases, or re-run with --force to proceed anyway"
        )

    def _reverted_interrupted(self, live: RolloutState, aliases: dict[str, str]) -> str:
        """What to tell an operator whose command is refused because the server's follower reverted an
        interrupted change (:meth:`follower_reverted`); empty when it did not."""
        intent = self.pending_intent()
        if intent is None or self.intent_outlook(intent, live, aliases)[0] != "changed":
            return ""
        reverted = self.follower_reverted(intent, live, aliases)
        if reverted is None:
            return ""
        installed = intent["set_aliases"]["production"]
        then = (
            f"roll it out again with `motlens promote canary start {installed} --percent N`, or reject it with "
            "`motlens promote rollback` (either records the interrupted promote as abandoned)"
            if intent["action"] == "promote"
            else "fix the live state or the aliases, or re-run with --force to proceed anyway"
        )
        return (
            f"the server's alias follower reverted the interrupted {intent['action']} ({intent['from']} → "
            f"{intent['to']}, begun {intent['at']} by {intent['actor']}) {reverted}. Version {installed} is not "
            f"in production and this run changed nothing: {then}"
        )

    def _execute(
        self,
        event: Event,
        live: RolloutState,
        aliases: dict[str, str],
        steps: list[RolloutState],
        *,
        set_aliases: dict[str, str] | None = None,
        delete_aliases: tuple[str, ...] = (),
        version_tags: dict[str, dict[str, str]] | None = None,
    ) -> Outcome:
        set_aliases = set_aliases or {}
        desired_aliases = {k: v for k, v in {**aliases, **set_aliases}.items() if k not in delete_aliases}
        desired = steps[-1] if steps else live
        if desired != live and live.pinned_after_rollback and not self.force and self._restored_ready(live) is False:
            # a change of the target now sends traffic to the rolled-back canary's revision; a re-run that
            # only brings the registry along (the target already as desired) goes ahead
            raise TargetUnavailable(f"{self._restoring(live)}; retry once it is (--force proceeds)")
        self._guard(live, aliases, desired, desired_aliases, event)
        event.from_state, event.to_state = live.describe(), desired.describe()
        event.percent = float(desired.percent or 0) if desired.canary_active else 0.0
        if self.dry_run:
            event.dry_run = True
            patches = [self.target.plan(s) for s in steps]
            event.ts = utc_now()  # a dry run's time is its decision's
            audit_ok = self._record(event, {})
            return Outcome(
                event.action,
                f"dry run: would take {live.describe()} → {desired.describe()}",
                gates=event.gates,
                patches=patches,
                audit_ok=audit_ok,
            )
        self._refuse_if_changed(event, live, aliases)
        finishing = self._partly_done(event) if desired == live else None
        resumed: datetime | None = None
        if finishing is not None:  # the change took effect then; this run only brings the registry along
            resumed, event.from_state, event.from_version, partial = finishing
            if "canary_revision" in partial:  # what the rollback saw then (the canary is gone now)
                event.details.setdefault("canary_revision", partial["canary_revision"])
            event.details["resumes"] = resumed.isoformat()
        # a change the registry must follow has an intent (a settle has nothing to record but its row)
        intent = (
            bool(version_tags)
            or any(aliases.get(a) != v for a, v in set_aliases.items())
            or any(a in aliases for a in delete_aliases)
        )
        abandoned_ok, abandoned = True, ""
        if intent:  # it replaces an interrupted change the target has moved on from (forced or not)
            pending = self.pending_intent()
            if pending is not None and self.intent_outlook(pending, live, aliases)[0] == "changed":
                abandoned_ok, abandoned = self._record_abandoned(pending, live, aliases, event)
        try:
            written = (
                self._write_intent(event, live, steps, set_aliases, delete_aliases, version_tags or {}, resumed)
                if intent
                else None
            )
        except PromotionError as e:
            raise PromotionError(_join_lines(str(e), abandoned)) from e
        patches = []
        applied_at: datetime | None = None
        try:
            for step in steps:
                patches.append(self.target.apply(step))
            applied_at = utc_now()  # the target confirmed the change: when it took effect
            if written is not None and steps and resumed is None:
                self._mark_applied(written, applied_at)
            self.target.check_lock()  # a Lease lost meanwhile: the registry is not changed either
            for alias, version in set_aliases.items():
                if aliases.get(alias) != version:
                    self.registry.set_alias(alias, version)
            for alias in delete_aliases:
                if alias in aliases:
                    self.registry.delete_alias(alias)
        except Exception as e:
            event.success, event.reason = False, f"{event.reason}; failed: {e}".lstrip("; ")
            changed = self._changed_since(live, aliases)
            # the target took it (not a re-run's): its time and the versions' state; a re-run that fails
            # is a plain failed row, which the next re-run's lookup passes over to the partly done one
            if changed and applied_at is not None and finishing is None:
                event.ts = applied_at
                event.details.update(partial=True, applied_at=applied_at.isoformat())
                self._record(event, _stamped(version_tags, applied_at))
            else:
                event.ts = utc_now()  # when it failed
                self._record(event, {v: {} for v in version_tags or {}})  # the audit, not the new state
            # recorded: the partly done row (or nothing changed) says what is left; else steps are left,
            # which the next command makes (its intent)
            if intent and (not changed or applied_at is not None):
                self._clear_intent()
            if not changed:
                raise PromotionError(_join_lines(f"{event.action} failed, nothing was changed: {e}", abandoned)) from e
            raise PartlyDone(
                _join_lines(
                    f"{event.action} failed part-way: {e}\nrun `motlens promote status` to see the state; "
                    "re-running the same command finishes it",
                    abandoned,
                )
            ) from e
        applied_at = resumed or applied_at
        assert applied_at is not None
        event.ts = applied_at
        audit_ok = self._record(event, _stamped(version_tags, applied_at))
        if intent and (audit_ok or self._tags_written(version_tags or {})):  # else the next run writes the tags
            self._clear_intent()
        return Outcome(
            event.action,
            _join_lines(f"{live.describe()} → {desired.describe()}", abandoned),
            changed=True,
            gates=event.gates,
            patches=patches,
            audit_ok=audit_ok and abandoned_ok,
        )

    # ------------------------------------------------------------------ write-ahead intent

    def _intent_key(self) -> str:
        """The registered model's tag holding this target's unfinished change: one per target (its
        namespace and name, its overlay, its server), as each has its own lock."""
        return INTENT_TAG + hashlib.sha256(self.target.describe().encode()).hexdigest()[:16]

    def _write_intent(
        self,
        event: Event,
        live: RolloutState,
        steps: list[RolloutState],
        set_aliases: dict[str, str],
        delete_aliases: tuple[str, ...],
        version_tags: dict[str, dict[str, str]],
        applied_at: datetime | None,
    ) -> dict[str, Any]:
        """Before the target changes: the whole change (each target step, the aliases, the version tags),
        so that a run killed before its audit is finished by the next one (:meth:`_finish_interrupted`).
        Its id goes into the event's details: the row that records the change names it. Returns it."""
        event.details["intent"] = uuid.uuid4().hex
        intent = {
            "id": event.details["intent"],
            "target": self.target.describe(),
            "at": utc_now().isoformat(),
            "applied_at": applied_at.isoformat() if applied_at else None,  # a resumed change's
            "action": event.action,
            "actor": event.actor,
            "from_version": event.from_version,
            "to_version": event.to_version,
            "percent": event.percent,
            "reason": event.reason,
            "gates": [r.to_json() for r in event.gates],
            "details": event.details,
            "from": event.from_state,
            "to": event.to_state,
            "from_state": _compared(live),
            "steps": [asdict(step) for step in steps],
            "set_aliases": set_aliases,
            "delete_aliases": list(delete_aliases),
            "version_tags": version_tags,
        }
        try:
            self._store_intent(intent)
        except Exception as e:
            event.success, event.reason = False, _join(event.reason, f"could not record the change's intent: {e}")
            event.ts = utc_now()
            self._record(event, {})
            raise PromotionError(f"{event.action} not done, nothing was changed: the registry failed: {e}") from e
        return intent

    def _mark_applied(self, intent: dict[str, Any], applied_at: datetime) -> None:
        """The time the target took the change, in its intent: a run killed before its audit is recorded
        by the next one at that time, not at the next one's (minutes or hours later)."""
        intent["applied_at"] = applied_at.isoformat()
        try:
            self._store_intent(intent)
        except Exception as e:  # noqa: BLE001 - the registry's own writes next fail or succeed alike
            log.warning("could not record when the change took effect in its intent: %s", e)

    def _intent_applied_at(self, intent: dict[str, Any], event: Event) -> datetime:
        """When an intent's change took effect: as marked (:meth:`_mark_applied`), else (its run stopped
        while applying it) when the change began, which the row's details say."""
        if (applied := parse_ts(intent["applied_at"])) is not None:
            return applied
        event.details["applied_at_estimated"] = "the change's start: its run stopped while applying it"
        return parse_ts(intent["at"]) or utc_now()

    def _store_intent(self, intent: dict[str, Any]) -> None:
        """Write ``intent`` as this target's registered-model tag (read back by :meth:`pending_intent`)."""
        self.registry.set_model_tag(self._intent_key(), json.dumps(intent, default=str))

    def _clear_intent(self) -> None:
        try:
            self.registry.delete_model_tag(self._intent_key())
        except Exception as e:  # noqa: BLE001 - the next run finds the change recorded and drops it
            log.warning("could not clear the recorded intent of this change: %s", e)

    def read_intent(self) -> dict[str, Any] | None:
        """This target's recorded intent (:meth:`_write_intent`), if a change left one; raises when the
        registry cannot be read."""
        raw = self.registry.model_tags().get(self._intent_key())
        return json.loads(raw) if raw else None

    def pending_intent(self) -> dict[str, Any] | None:
        """:meth:`read_intent`, None when the registry cannot be read."""
        try:
            return self.read_intent()
        except Exception as e:  # noqa: BLE001 - the change this run makes fails on the same registry
            log.warning("could not read the registry for an interrupted change: %s", e)
            return None

    def follower_reverted(self, intent: dict[str, Any], live: RolloutState, aliases: dict[str, str]) -> str | None:
        """How a server following alias ``production`` undid ``intent``'s change, if it did and its version
        still serves production (else None): the change put version V into production through the admin
        API and stopped before moving the alias (the registry unreachable, say); the alias did not come to
        name V within the server's grace for an admin install, so the server switched back to the alias's
        version (its ``follow`` row, target ``serve``, ``details.cause`` ``admin_grace_expired``)."""
        installed, restored = intent["set_aliases"].get("production"), aliases.get("production")
        if not installed or not restored or installed == restored or live.production_version != restored:
            return None
        try:
            row = self.reader().last_production_change(restored)
        except Exception as e:  # noqa: BLE001 - not known then: the plain "changed since" stands
            log.warning("could not read promotion_events for a follower's revert: %s", e)
            return None
        # any server's row: the trail does not say which server a target is (a row's actor is
        # "motlens serve@HOST"), so a follower of another server on the same log counts too
        if (
            row is None
            or row.get("target") != SERVE_TARGET
            or row.get("action") != "follow"
            or str(row.get("from_version")) != installed
        ):
            return None
        details, at, began = _details(row), as_utc(row.get("ts")), parse_ts(intent["at"])
        if details.get("cause") != "admin_grace_expired" or at is None or (began is not None and at < began):
            return None  # another revert, or one from before this change began
        return (
            f"at {at:%Y-%m-%d %H:%M:%S} UTC: alias 'production' did not come to name version {installed} within "
            f"the admin API's grace ({float(details.get('grace_s') or 0):.0f} s), so version {restored} serves "
            "production again"
        )

    def intent_outlook(
        self, intent: dict[str, Any], live: RolloutState, aliases: dict[str, str]
    ) -> tuple[str, list[RolloutState]]:
        """What the next command does with ``intent``: ``finish`` (with the target steps still to apply),
        ``recorded`` (the registry followed: dropped), ``unapplied`` (the target never changed: dropped) or
        ``changed`` (the target is in a state the change does not lead through: left to the guard)."""
        steps = [RolloutState(**d) for d in intent["steps"]]
        if self._tags_written(intent["version_tags"]) and all(
            aliases.get(a) == v for a, v in intent["set_aliases"].items()
        ) and not any(a in aliases for a in intent["delete_aliases"]):  # fmt: skip
            return "recorded", []
        state = _compared(live)
        if state == (_compared(steps[-1]) if steps else intent["from_state"]):  # no steps: a registry-only change
            return "finish", []
        if state == intent["from_state"]:
            return "unapplied", []
        for k, step in enumerate(steps[:-1]):
            if state == _compared(step):
                return "finish", steps[k + 1 :]
        return "changed", []

    def _finish_interrupted(self, live: RolloutState, aliases: dict[str, str]) -> Outcome | None:
        """A change whose run stopped (killed, or its tags failed) after the target took it, or part of it:
        its intent (:meth:`_write_intent`). The rest of the change is made (target steps left, aliases,
        version tags, its row) and that is all this run does: a re-run of a rollback must not then roll
        production back too. An intent whose change never reached the target, or whose tags are written
        (its row then written if missing) is dropped, and the command goes on only in the first case (a re-run
        of a complete rollback is not a second one); one whose target changed since is left to the guard."""
        intent = self.pending_intent()
        if intent is None:
            return None
        outlook, rest = self.intent_outlook(intent, live, aliases)
        if outlook == "changed":  # left to the guard; a change that goes ahead records it first (_execute)
            return None
        event = self._intent_event(intent)
        what = f"the interrupted {event.action} ({intent['from']} → {intent['to']}, begun {intent['at']})"
        if outlook == "unapplied":  # killed before the target changed: nothing to finish, the command goes on
            if not self.dry_run:
                log.warning("%s never reached the target; its intent dropped", what)
                self._clear_intent()
            return None
        if outlook == "recorded":  # complete but for its row or the intent's removal: nothing more to do
            if not self.dry_run:
                if not self._recorded(intent):
                    event.ts = self._intent_applied_at(intent, event)
                    self._record(event, {})
                self._clear_intent()
            return Outcome(
                event.action,
                f"{'dry run: ' if self.dry_run else ''}{what} was complete but for its record; nothing else was "
                "done (run the command again for anything further)",
                gates=event.gates,
            )
        if self.dry_run:
            return Outcome(event.action, f"dry run: would finish {what} and do nothing else", gates=event.gates)
        try:
            for step in rest:
                self.target.apply(step)
            applied_at = self._intent_applied_at(intent, event)
            self.target.check_lock()
            for alias, version in intent["set_aliases"].items():
                if aliases.get(alias) != version:
                    self.registry.set_alias(alias, version)
            for alias in intent["delete_aliases"]:
                if alias in aliases:
                    self.registry.delete_alias(alias)
        except Exception as e:
            raise PartlyDone(f"could not finish {what}: {e}\nre-running the command finishes it") from e
        event.ts = applied_at
        ok = self._record(event, _stamped(intent["version_tags"], applied_at))
        if ok or self._tags_written(intent["version_tags"]):
            self._clear_intent()
        return Outcome(
            event.action,
            f"finished {what}: the registry now follows the target; nothing else was done (run the command "
            "again for anything further)",
            changed=True,
            gates=event.gates,
            audit_ok=ok,
        )

    def _record_abandoned(
        self, intent: dict[str, Any], live: RolloutState, aliases: dict[str, str], by: Event
    ) -> tuple[bool, str]:
        """An interrupted change whose target changed since, found as this run's ``by`` (forced or not)
        begins: its row (failed, ``abandoned``: who began it, why, when, which run recorded it) so the trail
        keeps it, once (its row names the intent, as a run that failed after writing it leaves the intent),
        then its intent dropped. Returns whether the row is written, and the notice for the operator."""
        event = self._intent_event(intent)
        reverted = self.follower_reverted(intent, live, aliases)
        what = (
            f"the interrupted {event.action} ({intent['from']} → {intent['to']}, begun {intent['at']} by {event.actor})"
        )
        why = f"the server's alias follower reverted it {reverted}" if reverted else "the target changed since"
        if self._abandoned_recorded(intent):
            self._clear_intent()
            return True, f"{what} was recorded as abandoned by an earlier run: {why}"
        event.success = False
        event.reason = _join(
            intent["reason"],
            f"abandoned: its run stopped before its audit and the target changed since (now {live.describe()})",
            f"the server's alias follower reverted it {reverted}" if reverted else "",
            f"recorded as abandoned when {by.action} {by.from_version}→{by.to_version} of {by.actor}"
            + (" with --force" if self.force else "")
            + " began",
        )
        event.details.update(abandoned=True, recorded_by={"action": by.action, "actor": by.actor})
        event.ts = self._intent_applied_at(intent, event) if intent["applied_at"] else utc_now()
        log.warning("%s", event.reason)
        ok = self._record(event, {})
        if ok:
            self._clear_intent()
        return ok, f"{what} {'is recorded' if ok else 'could not be recorded (see the log)'} as abandoned: {why}"

    def _abandoned_recorded(self, intent: dict[str, Any]) -> bool:
        """Whether the trail holds ``intent``'s abandoned row (:meth:`_record_abandoned`); False when it
        cannot be read (the row is written then: twice rather than not at all)."""
        try:
            found = self.reader().query(
                "SELECT count() AS n FROM promotion_events WHERE JSONExtractBool(details, 'abandoned') "
                "AND JSONExtractString(details, 'intent') = {intent:String}",
                {"intent": intent["id"]},
            )
        except Exception as e:  # noqa: BLE001
            log.warning("could not read promotion_events for an abandoned change: %s", e)
            return False
        return int(found["n"].iloc[0]) > 0

    def _intent_event(self, intent: dict[str, Any]) -> Event:
        """The event of an intent's change, as a later run records it."""
        event = self._event(intent["action"], from_version=intent["from_version"], to_version=intent["to_version"])
        event.actor, event.percent, event.from_state, event.to_state = (
            intent["actor"], float(intent["percent"]), intent["from"], intent["to"]
        )  # fmt: skip
        event.gates = [g.GateResult(**r) for r in intent["gates"]]
        event.reason = _join(intent["reason"], f"finished by a later run ({self.settings.who}): its own stopped "
                                               "before its audit")  # fmt: skip
        event.details = {**intent["details"], "finishes": intent["at"]}
        return event

    def _recorded(self, intent: dict[str, Any]) -> bool:
        """Whether the audit trail's newest change is the intent's (its row names the intent)."""
        try:
            row = self.reader().last_change(self.target.name, MODEL_NAME)
        except Exception as e:  # noqa: BLE001 - the row is written (again) then
            log.warning("could not read promotion_events for an interrupted change: %s", e)
            return False
        return row is not None and bool(row.get("success")) and _details(row).get("intent") == intent["id"]

    def _tags_written(self, version_tags: dict[str, dict[str, str]]) -> bool:
        """Whether every version carries the state tags a change gives it (times aside)."""
        try:
            for version, tags in version_tags.items():
                have = self.registry.resolve(version).tags
                if any(have.get(k) != v for k, v in tags.items() if v != _APPLIED_AT):
                    return False
        except Exception as e:  # noqa: BLE001 - written again then
            log.warning("could not read the version tags of an interrupted change: %s", e)
            return False
        return True

    def _partly_done(self, event: Event) -> tuple[datetime, str, str, dict[str, Any]] | None:
        """When a re-run finds the target already as ``event`` would leave it: the partly done row it
        finishes, as (applied at, its from state, its from version, its details), else None. That row must be this
        target's newest change (a successful or partly done row; holds, refusals, dry runs and failures
        that changed nothing do not count): a partial row of an earlier rollout, followed by other
        changes, is history, not this run's to finish."""
        try:
            row = self.reader().last_change(self.target.name, MODEL_NAME)
        except Exception as e:  # noqa: BLE001 - recorded as this run's own change then
            log.warning("could not read promotion_events for an interrupted change: %s", e)
            return None
        if row is None:
            return None
        details = _details(row)
        applied = parse_ts(details.get("applied_at"))
        if (
            not details.get("partial")
            or applied is None
            or row.get("action") != event.action
            or str(row.get("to_version")) != event.to_version
            or details.get("to") != event.to_state
        ):
            return None
        return applied, str(details.get("from", "")), str(row.get("from_version") or ""), details

    def _record_refusal(self, event: Event, live: RolloutState, why: str) -> None:
        """Record ``event`` as refused (exit 3) with the state it left as it was; a refused ``hold`` (an
        ``auto`` run, every few minutes while the refusal lasts) writes its row only, as every hold does."""
        event.success, event.refused = False, True
        event.reason = _join(event.reason, why)
        event.from_state = event.to_state = live.describe()
        event.percent = float(live.percent or 0) if live.canary_active else 0.0
        event.ts = utc_now()
        self._record(event, {event.to_version: {}} if event.to_version and event.action != "hold" else {})

    def _record(self, event: Event, version_tags: dict[str, dict[str, str]]) -> bool:
        """Tags on every version involved + a promotion_events row + metrics; False if any part failed."""
        ok = True
        if not event.dry_run:
            for version in sorted(version_tags):
                try:
                    tag_version(self.registry, version, event, version_tags.get(version))
                except Exception as e:  # noqa: BLE001 - the change stands; report the audit gap
                    log.error("could not tag version %s: %s", version, e)
                    ok = False
        try:
            self.reader().insert_promotion_event(event.row())
        except Exception as e:  # noqa: BLE001
            log.error("could not write the promotion_events row: %s", e)
            ok = False
        if not event.dry_run and (self.settings.pushgateway_url or self.settings.textfile):
            try:
                live_pct = event.percent if event.success else self._live_percent()
                export_metrics(self.settings, self.registry.aliases(), live_pct)
            except Exception as e:  # noqa: BLE001
                log.error("could not export promotion metrics: %s", e)
                ok = False
        return ok

    def _refuse_if_changed(self, event: Event, live: RolloutState, aliases: dict[str, str]) -> None:
        """Read the target and the aliases again just before a change: a ``kubectl edit`` (a canary paused
        at 0 %, a hot-fixed URI) made while the gates ran is not overwritten by a change decided on the
        state before it. Recorded as a failed ``event``; nothing is changed."""
        now = self._reread()
        if isinstance(now, Exception):
            why = f"could not read the live state again before changing it: {now}"
        elif now == (live, aliases):
            return
        else:
            seen = f"{now[0].describe()}, aliases {now[1]}"
            why = f"the live state changed while the gates ran (read {live.describe()}, aliases {aliases}; now {seen})"
        event.success, event.reason = False, f"{event.reason}; {why}".lstrip("; ")
        event.ts = utc_now()
        self._record(event, {})
        raise PromotionError(f"{event.action} not done, nothing was changed: {why}; run it again")

    def _changed_since(self, live: RolloutState, aliases: dict[str, str]) -> bool:
        """Whether the target or the aliases differ from ``live``/``aliases`` (True when unreadable)."""
        now = self._reread()
        return isinstance(now, Exception) or now != (live, aliases)  # URIs and digests included

    def _reread(self) -> tuple[RolloutState, dict[str, str]] | Exception:
        """:meth:`snapshot` again, or why it cannot be read (then whether anything changed is unknown)."""
        try:
            return self.snapshot()
        except Exception as e:  # noqa: BLE001 - the callers decide what an unreadable state means
            return e

    def _live_percent(self) -> float:
        """The canary's share as the target serves it now (after a refused or failed action)."""
        live = self.target.read()
        return float(live.percent or 0) if live.canary_active else 0.0

    def _event(self, action: str, **kw: Any) -> Event:
        return Event(action=action, actor=self.settings.who, target=self.target.name, dry_run=self.dry_run, **kw)

    def _refuse_on_gates(self, event: Event, what: str) -> None:
        verdict = g.summarize(event.gates)
        if verdict == g.PASS:
            return
        failed = "; ".join(f"{r.name}: {r.status} ({r.detail})" for r in event.gates if r.status != g.PASS)
        if self.force:
            log.warning("--force: %s although gates did not pass: %s", what, failed)
            event.reason = _join(event.reason, f"forced past gates: {failed}")
            return
        event.success, event.refused = False, True
        event.reason = _join(event.reason, f"gates {verdict}: {failed}")
        event.ts = utc_now()  # a refusal's time is its decision's (the gates may take a while)
        if not event.from_state:  # refused before a change was planned: the state it left as it was
            try:
                live = self.target.read()
            except Exception as e:  # noqa: BLE001 - the refusal is recorded either way
                log.warning("could not read the live state for the audit row: %s", e)
            else:
                event.from_state = event.to_state = live.describe()
                event.percent = float(live.percent or 0) if live.canary_active else 0.0
        self._record(event, {event.to_version: {}})
        raise Refused(
            f"{what} refused, gates did not pass:\n  - "
            + "\n  - ".join(f"{r.name}: {r.status} — {r.detail}" for r in event.gates)
            + "\n(--force overrides)"
        )

    def _refuse_verdict(self, event: Event, live: RolloutState, what: str) -> None:
        """Refuse (exit 3, recorded) rolling out a rejected or retired version; --force proceeds and the
        event's reason says what it overrode."""
        found = self.evidence.verdict(event.to_version)
        if found is None:
            return
        status, detail = found
        if self.force:
            log.warning("--force: %s although %s", what, detail)
            event.reason = _join(event.reason, f"forced past status {status}: {detail}")
            return
        self._record_refusal(event, live, f"refused: {detail}")
        raise Refused(
            f"{what} refused: {detail}\n(--force rolls it out anyway; the override is recorded in the event's reason)"
        )

    # ------------------------------------------------------------------ actions

    def canary_start(self, version: str | None, percent: int, reason: str = "") -> Outcome:
        check_or_raise(percent)
        with self.locked():
            live, aliases = self._settled_snapshot()
            if (finished := self._finish_interrupted(live, aliases)) is not None:
                return finished
            if version is None:
                version = aliases.get("candidate")
                if version is None:
                    raise PromotionError(
                        "no version given and the registry has no 'candidate' alias "
                        "(train one with `motlens train --alias candidate`)"
                    )
            version = self.info(version).version
            production = aliases.get("production") or live.production_version
            if production is None:
                raise PromotionError(
                    f"nothing is in production yet: deploy a first version with `motlens promote promote {version}`"
                )
            if version == production:
                if aliases.get("production") == version and not self._serves(live, version):
                    raise PromotionError(
                        f"the registry's 'production' alias names version {version} but "
                        f"{self.target.describe()} serves {live.describe()} from {live.serving_production_uri}: "
                        f"deploy it with `motlens promote promote {version}`"
                    )
                if aliases.get("production") == version:
                    adopt = ""
                elif self._serves(live, version):  # a deploy that stopped before the alias: a rerun sets it
                    adopt = f"; `motlens promote promote {version}` sets the registry's 'production' alias to it"
                else:  # the target names it, from another URI (e.g. the fresh overlay's placeholder)
                    adopt = f"; `motlens promote promote {version} --force` adopts it in the registry"
                raise PromotionError(f"version {version} is already production{adopt}")
            if live.canary_active and live.canary_version != version and not self.force:
                raise PromotionError(
                    f"canary version {live.canary_version} is running at {live.percent}%: "
                    "promote or roll it back first (or --force to replace it)"
                )
            resumed = live.canary_active and live.canary_version == version
            if resumed and aliases.get("canary") == version:
                # a fresh start would re-stamp the start time (dropping drift evidence since then)
                # and change the share behind offline gates only: steps go through set/advance
                raise PromotionError(
                    f"canary version {version} is already running at {live.percent}%: change its share "
                    "with `motlens promote canary set N` or `motlens promote advance`"
                )
            event = self._event("canary_start", from_version=production, to_version=version, reason=reason)
            self._refuse_verdict(event, live, f"canary of version {version}")
            event.gates = self.evidence.offline_gates(version, production)
            self._refuse_on_gates(event, f"canary of version {version}")
            tags = {STATUS_TAG: "canary", PERCENT_TAG: str(percent), **self._moved_verdicts(version)}
            if resumed:  # finishing an interrupted start: the canary keeps its start time
                desired = live.with_percent(percent)
                known = self.info(version).tags  # times written by this start, if it got that far
                ours = known.get(STATUS_TAG) == "canary"
                tags |= {t: _APPLIED_AT for t in (STARTED_AT_TAG, STEP_AT_TAG) if not (ours and t in known)}
            else:
                desired = live.with_canary(version, self.uri(version), percent, self.digest(version))
                tags |= {STARTED_AT_TAG: _APPLIED_AT, STEP_AT_TAG: _APPLIED_AT}
                if not live.canary_active and aliases.get("canary") == version:
                    known = self.info(version).tags  # the registry's canary, gone from the target (a restart)
                    if known.get(STATUS_TAG) == "canary" and STARTED_AT_TAG in known:
                        del tags[STARTED_AT_TAG]  # reloaded, it keeps its start time
            version_tags = {version: tags}
            if live.canary_active and live.canary_version != version:  # --force replaced a running canary
                replaced = str(live.canary_version)
                version_tags[replaced] = _retired(f"replaced by {version}")
                event.reason = f"{event.reason}; replaced canary {replaced}".lstrip("; ")
            return self._execute(
                event, live, aliases, [desired], set_aliases={"canary": version}, version_tags=version_tags
            )

    def canary_set(self, percent: int, reason: str = "") -> Outcome:
        """Set the canary's share directly (what a ``kubectl edit`` of canaryTrafficPercent does)."""
        check_or_raise(percent)
        with self.locked():
            live, aliases = self._settled_snapshot()
            if (finished := self._finish_interrupted(live, aliases)) is not None:
                return finished
            if not live.canary_active:
                raise PromotionError(f"no canary is running on {self.target.describe()} ({live.describe()})")
            version = str(live.canary_version)
            event = self._event(
                "canary_set", from_version=live.production_version or "", to_version=version, reason=reason
            )
            return self._execute(
                event,
                live,
                aliases,
                [live.with_percent(percent)],
                version_tags={version: {STEP_AT_TAG: _APPLIED_AT, PERCENT_TAG: str(percent)}},
            )

    def next_step(self, percent: int | None) -> int | None:
        return next((s for s in self.settings.steps if s > (percent or 0)), None)

    def advance(self, reason: str = "") -> Outcome:
        with self.locked():
            live, aliases = self._settled_snapshot()
            if (finished := self._finish_interrupted(live, aliases)) is not None:
                return finished
            if not live.canary_active:
                raise PromotionError(f"no canary is running on {self.target.describe()} ({live.describe()})")
            nxt = self.next_step(live.percent)
            if nxt is None:
                raise PromotionError(f"canary is at {live.percent}%, the last step; run `motlens promote promote`")
            return self._advance(live, aliases, nxt, reason)

    def _advance(self, live: RolloutState, aliases: dict[str, str], nxt: int, reason: str = "") -> Outcome:
        version = str(live.canary_version)
        production = live.production_version
        event = self._event("advance", from_version=production or "", to_version=version, reason=reason)
        event.gates = self.evidence.offline_gates(version, production) + self.evidence.health_gates(version, production)
        self._refuse_on_gates(event, f"advancing version {version} from {live.percent}% to {nxt}%")
        return self._execute(
            event,
            live,
            aliases,
            [live.with_percent(nxt)],
            version_tags={version: {STEP_AT_TAG: _APPLIED_AT, PERCENT_TAG: str(nxt)}},
        )

    def promote(self, version: str | None = None, reason: str = "") -> Outcome:
        with self.locked():
            live, aliases = self._settled_snapshot()
            if (finished := self._finish_interrupted(live, aliases)) is not None:
                return finished
            canary = live.canary_version or aliases.get("canary")
            if version is not None:
                version = self.info(version).version
            if canary is not None and version in (None, canary):
                return self._promote_canary(live, aliases, canary, reason)
            if version is None:
                raise PromotionError("no canary to promote (give a VERSION to deploy one directly)")
            return self._deploy(live, aliases, version, reason)

    def _promote_canary(self, live: RolloutState, aliases: dict[str, str], version: str, reason: str = "") -> Outcome:
        previous = aliases.get("production") if aliases.get("production") != version else live.production_version
        event = self._event("promote", from_version=previous or "", to_version=version, reason=reason)
        if live.canary_active:
            event.gates = self.evidence.offline_gates(version, previous) + self.evidence.health_gates(version, previous)
            self._refuse_on_gates(event, f"promoting version {version}")
            desired = live.promoted()
        else:
            desired = live  # resuming: the live side is already done
        tags = {version: {STATUS_TAG: "production", "promotion.promoted_at": _APPLIED_AT, PERCENT_TAG: "0"}}
        if previous and previous != version:
            tags[version][PREVIOUS_TAG] = previous
            tags[previous] = _retired(f"replaced in production by version {version}")
        return self._execute(
            event,
            live,
            aliases,
            [desired] if live.canary_active else [],
            set_aliases={"production": version},
            delete_aliases=("canary",),
            version_tags=tags,
        )

    def _deploy(self, live: RolloutState, aliases: dict[str, str], version: str, reason: str = "") -> Outcome:
        """Straight to production without a canary: the first deployment, the version the registry's
        'production' alias names brought live, or forced."""
        alias, serving = aliases.get("production"), live.production_version
        live_prod = serving if serving != version and self._serves(live, serving) else None
        registry_prod = alias if alias != version else None
        baseline = live_prod or registry_prod  # what leaves traffic, else what the registry called production
        # the version already serves and the registry says so: only its bundle digest is added (_unpinned)
        pin_only = serving == alias == version and self._serves(live, version)
        if pin_only:
            reason = "; ".join(r for r in (f"pin the bundle digest of version {version}", reason) if r)
        event = self._event("deploy", from_version=baseline or serving or "", to_version=version, reason=reason)
        found = self.evidence.verdict(version)
        # bringing the target in line with the registry's production alias is not rolling a retired
        # version out again (a promotion retires what it replaces); a rejected one stays refused
        if alias != version or (found is not None and found[0] == "rejected"):
            self._refuse_verdict(event, live, f"deploying version {version}")
        if not self.force:  # after the verdict: a rejected version is refused as such, not sent to `canary start`
            self._check_deploy(live, alias, version)
        event.gates = self.evidence.offline_gates(version, baseline)
        self._refuse_on_gates(event, f"deploying version {version}")
        desired = live.deployed(version, self.uri(version), self.digest(version))
        tags = {
            version: {
                STATUS_TAG: "production",
                "promotion.promoted_at": _APPLIED_AT,
                PREVIOUS_TAG: baseline or "",
                **self._moved_verdicts(version),
            }
        }
        if pin_only:  # its promotion record stands: what it replaced is what a production rollback restores
            tags = {version: {STATUS_TAG: "production"}}
        for previous in {live_prod, registry_prod} - {None}:
            tags[str(previous)] = _retired(f"replaced in production by version {version} (deploy)")
        dropped = live.canary_version if live.canary_active else aliases.get("canary")
        if dropped and dropped != version and self._exists(dropped):
            tags[dropped] = _retired(f"canary dropped: deployed {version}")
        return self._execute(
            event,
            live,
            aliases,
            [desired],
            set_aliases={"production": version},
            delete_aliases=("canary",),
            version_tags=tags,
        )

    def _check_deploy(self, live: RolloutState, alias: str | None, version: str) -> None:
        """Refuse a direct deploy that has nothing to do, or that needs --force (it would replace a
        production the registry does not hand to ``version``, or drop a running canary)."""
        where, serving = self.target.describe(), live.production_version
        if self._serves(live, version):
            if alias == version and not self._unpinned(live, version):
                raise PromotionError(
                    f"version {version} is already production on {where}: it serves it and the registry's "
                    "'production' alias names it"
                )
        elif serving == version and alias != version:
            raise PromotionError(
                f"{where} names version {version} as production but serves {live.serving_production_uri}, "
                f"not its artifact URI; --force adopts it (sets the 'production' alias and the storage URI "
                f"of version {version})"
            )
        elif alias != version and (serving or alias) is not None:
            raise PromotionError(
                f"version {serving or alias} is in production: roll out {version} with "
                f"`motlens promote canary start {version}` (or --force to replace it directly)"
            )
        if live.canary_active:
            raise PromotionError(f"canary version {live.canary_version} is running: promote or roll it back first")

    def _serves(self, live: RolloutState, version: str | None) -> bool:
        """Whether the target serves ``version`` as production (its version and its artifact URI)."""
        uri = self._uri_or_none(version) if version else None
        return uri is not None and live.production_version == version and live.serving_production_uri == uri

    def _unpinned(self, live: RolloutState, version: str) -> bool:
        """Whether production serves ``version`` without the bundle digest the registry has for it (an
        InferenceService from before digests were pinned): a deploy of the same version pins it."""
        try:
            expected = self.digest(version)
        except PromotionError:
            return False
        return expected is not None and live.serving_production_sha256 != expected

    def _exists(self, version: str) -> bool:
        try:
            self.info(version)
        except PromotionError:
            return False
        return True

    def rollback(self, reason: str = "manual rollback", gates: list[g.GateResult] | None = None) -> Outcome:
        with self.locked():
            live, aliases = self._settled_snapshot()
            if (finished := self._finish_interrupted(live, aliases)) is not None:
                return finished
            version = live.canary_version or aliases.get("canary")
            if version is None:
                return self._rollback_production(live, aliases, reason)
            production = live.production_version or aliases.get("production")
            if not live.canary_active and version == live.production_version:
                raise PromotionError(  # an interrupted promote: rolling "back" would reject what serves
                    f"version {version} already serves production on {self.target.describe()}; finish the "
                    f"promotion with `motlens promote promote` or deploy another version"
                )
            event = self._event("rollback", from_version=version, to_version=production or "", reason=reason)
            event.gates = list(gates or [])
            if live.canary_active and live.latest_created:  # the revision the canary served: see _restored_ready
                event.details["canary_revision"] = live.latest_created
            try:
                steps = [live.with_percent(0), live.with_percent(0).rolled_back()] if live.canary_active else []
            except RolloutError as e:
                raise PromotionError(str(e)) from e
            return self._execute(
                event,
                live,
                aliases,
                steps,
                delete_aliases=("canary",),
                version_tags={version: _rejected(reason)},
            )

    def _rollback_production(self, live: RolloutState, aliases: dict[str, str], reason: str) -> Outcome:
        """No canary: production goes back to the version it replaced (tag ``promotion.previous_production``,
        else the ``promotion_events`` table), through the golden check only (it served before: the offline
        comparison with the version rolled back from does not apply); the version left is rejected."""
        where = self.target.describe()
        current = aliases.get("production") or live.production_version
        if current is None:
            raise PromotionError(f"no canary to roll back on {where} ({live.describe()}), and nothing in production")
        previous, source = self.previous_production(current)
        if previous is None:
            raise PromotionError(
                f"no canary to roll back on {where} ({live.describe()}), and no production version before "
                f"version {current} is recorded ({source}): deploy one with `motlens promote promote VERSION "
                f"--force`"
            )
        if not self._exists(previous):
            raise PromotionError(
                f"no canary to roll back on {where}; version {previous}, production before version {current} "
                f"({source}), is not in the registry"
            )
        event = self._event("rollback", from_version=current, to_version=previous, reason=reason)
        found = self.evidence.verdict(previous)
        if found is not None and found[0] == "rejected":  # retired is what a promotion leaves: the way back
            if not self.force:
                event.success, event.refused = False, True
                event.reason = _join(event.reason, f"refused: {found[1]}")
                event.from_state = event.to_state = live.describe()
                event.ts = utc_now()
                self._record(event, {previous: {}})
                raise Refused(
                    f"rolling production back from version {current} to {previous} ({source}) refused: "
                    f"{found[1]}\n(--force restores it anyway; the override is recorded in the event's reason)"
                )
            event.reason = _join(event.reason, f"forced past status rejected: {found[1]}")
        event.gates = self.evidence.golden_gates(previous)
        self._refuse_on_gates(event, f"rolling production back from version {current} to {previous}")
        tags = {
            previous: {
                STATUS_TAG: "production",
                "promotion.promoted_at": _APPLIED_AT,
                PREVIOUS_TAG: current,
                **self._moved_verdicts(previous),
            },
            current: _rejected(reason),
        }
        return self._execute(
            event,
            live,
            aliases,
            [live.deployed(previous, self.uri(previous), self.digest(previous))],
            set_aliases={"production": previous},
            version_tags=tags,
        )

    def previous_production(self, version: str) -> tuple[str | None, str]:
        """The production version that ``version`` replaced, and where that was read. The newest applied
        change that made ``version`` production in the ``promotion_events`` table decides: a ``follow``
        row (the alias moved outside motlens and a server followed it) names the version it replaced;
        a motlens change wrote the tag ``promotion.previous_production`` at the same time, which is read
        (and is all there is while the table cannot be read). For versions promoted before that tag
        existed, a promote or deploy row counts when the version it replaced was retired by it."""
        tag = self.info(version).tags.get(PREVIOUS_TAG)
        try:
            row = self.reader().last_production_change(version)
        except Exception as e:  # noqa: BLE001 - no audit trail to read: the tag alone
            row, unreadable = None, f"promotion_events unreadable: {e}"
        else:
            unreadable = ""
        before = str((row or {}).get("from_version") or "")
        usable = bool(before) and before != version and self._exists(before)
        where = f"the promotion_events table: {(row or {}).get('action')} {before}→{version} at {(row or {}).get('ts')}"
        if row is not None and row.get("action") == "follow" and usable:
            return before, where
        if tag is not None:
            return tag or None, f"tag {PREVIOUS_TAG} of version {version}"
        if (
            row is not None
            and row.get("action") in ("promote", "deploy")
            and usable
            and self.info(before).tags.get(STATUS_TAG) in VERDICTS
        ):
            return before, where
        return None, f"no tag {PREVIOUS_TAG} on version {version} and " + (
            unreadable or "no promote, deploy or follow to it in promotion_events"
        )

    def _moved_verdicts(self, version: str) -> dict[str, str]:
        """Tags that move a stale rejected/retired reason and time of ``version`` to ``previous_*`` (kept
        readable in the history) and clear them, as it is rolled out again."""
        tags, out = self.info(version).tags, {}
        for status in VERDICTS:
            for what in ("reason", "at"):
                key = f"promotion.{status}_{what}"
                if tags.get(key):
                    out[f"promotion.previous_{status}_{what}"] = tags[key]
                    out[key] = ""
        return out

    def auto(self) -> Outcome:
        """One CronJob run: evaluate gates, then start, advance, promote, roll back or hold."""
        try:
            with self.locked(blocking=False):
                return self._auto()
        except LockBusy as e:
            return self._hold(None, [], f"{e}; nothing done")

    def _auto(self) -> Outcome:
        try:
            live, aliases = self.snapshot()
        except TargetUnavailable as e:
            return self._hold(None, [], f"{e}; holding until it answers")
        if live.not_ready or live.loading:
            busy = ", ".join(filter(None, [live.not_ready and f"not ready: {live.not_ready}", live.loading]))
            return self._hold(None, [], f"{self.target.describe()} is {busy}; holding until it is ready")
        if (finished := self._finish_interrupted(live, aliases)) is not None:
            return finished
        problems = self.disagreements(live, aliases)
        if problems and not self.force:
            held = self._event("hold", from_version=live.production_version or "", to_version=live.canary_version or "")
            self._guard(live, aliases, live, aliases, held)  # records and raises Refused with the explanation
        if live.pinned_after_rollback:
            ready = self._restored_ready(live)
            if ready:
                return self._settle(live, aliases)
            if ready is False:  # a rollout now would send its share to the rolled-back canary's revision
                return self._hold(live, [], self._restoring(live))
        if not live.canary_active:
            return self._auto_start(live, aliases)
        version, production = str(live.canary_version), live.production_version
        gates = self.evidence.offline_gates(version, production) + self.evidence.health_gates(version, production)
        verdict = g.summarize(gates)
        if verdict == g.FAIL:
            failed = "; ".join(f"{r.name}: {r.detail}" for r in gates if r.status == g.FAIL)
            return self.rollback(reason=f"auto: {failed}", gates=gates)
        if live.percent == 0:
            return self._hold(live, gates, "canary is paused at 0% (set by hand); `canary set N` resumes it")
        if verdict == g.WAIT:
            waiting = "; ".join(f"{r.name}: {r.detail}" for r in gates if r.status == g.WAIT)
            return self._hold(live, gates, f"waiting for evidence: {waiting}")
        step_at = self.evidence.canary_times(version).since
        due = step_at + timedelta(seconds=self.settings.dwell_s)
        if utc_now() < due:
            return self._hold(
                live,
                gates,
                f"last step at {step_at:%H:%M:%S}; dwell {self.settings.min_step_interval_s:g}s less "
                f"{self.settings.min_step_interval_s - self.settings.dwell_s:g}s tolerance: the next from "
                f"{due:%H:%M:%S}",
            )
        nxt = self.next_step(live.percent)
        if nxt is None:
            return self._promote_canary(live, aliases, version)
        return self._advance(live, aliases, nxt)

    def _restored_ready(self, live: RolloutState) -> bool | None:
        """:meth:`RolloutState.restored_ready` against the revision the last rollback recorded as the
        canary's (None: that rollback recorded none; the names alone then decide)."""
        rolled_back = None
        try:
            row = self.reader().last_change(self.target.name, MODEL_NAME)
        except Exception as e:  # noqa: BLE001 - decided on the names alone
            log.warning("could not read promotion_events for the rollback's canary revision: %s", e)
        else:
            if row is not None and row.get("action") == "rollback":
                rolled_back = _details(row).get("canary_revision") or None
        return live.restored_ready(rolled_back)

    @staticmethod
    def _restoring(live: RolloutState) -> str:
        return (
            f"the rollback's restored revision is not ready yet (latest created {live.latest_created}, latest "
            f"ready {live.latest_ready_revision}): until it is, KServe routes a new rollout's traffic to the "
            "latest ready revision, the rolled-back canary's"
        )

    def _settle(self, live: RolloutState, aliases: dict[str, str]) -> Outcome:
        """After a rollback (:meth:`RolloutState.rolled_back`): the restored spec's revision is ready, so
        canaryTrafficPercent goes and that revision takes all traffic (the one last rolled out, serving
        the same version, is then scaled down)."""
        version = live.production_version or ""
        event = self._event(
            "settle",
            from_version=version,
            to_version=version,
            reason="the restored production revision is ready: canaryTrafficPercent 0 removed",
        )
        return self._execute(event, live, aliases, [live.settled()])

    def _auto_start(self, live: RolloutState, aliases: dict[str, str]) -> Outcome:
        candidate, production = aliases.get("candidate"), aliases.get("production")
        if candidate is None:
            return self._hold(live, [], "no 'candidate' alias; nothing to roll out")
        if candidate == production:
            return self._hold(live, [], f"candidate version {candidate} is already production")
        found = self.evidence.verdict(candidate)
        if found is not None:  # auto never overrides a verdict; `canary start V --force` does
            return self._hold(
                live,
                [],
                f"candidate {found[1]}; train or alias a new candidate (or `motlens promote canary start "
                f"{candidate} --force`)",
            )
        gates = self.evidence.offline_gates(candidate, production)
        if g.summarize(gates) == g.WAIT:  # e.g. the golden check could not run: try again next time
            return self._hold(live, gates, f"candidate version {candidate}: gates could not decide yet")
        if g.summarize(gates) != g.PASS:
            event = self._event(
                "reject",
                from_version=production or "",
                to_version=candidate,
                gates=gates,
                reason="offline gates failed",
                success=True,
            )
            event.from_state = event.to_state = live.describe()
            tags = {k: event.ts.isoformat() if v == _APPLIED_AT else v for k, v in _rejected(event.reason).items()}
            ok = self._record(event, {candidate: tags})
            return Outcome(
                "reject",
                f"candidate version {candidate} rejected: offline gates did not pass",
                changed=True,
                gates=gates,
                audit_ok=ok,
            )
        return self.canary_start(candidate, self.settings.steps[0])

    def _hold(self, live: RolloutState | None, gates: list[g.GateResult], why: str) -> Outcome:
        """A ``hold`` row (and metrics) for a run that changes nothing; ``live`` is None when another
        run holds the lock (its state is not read then, and its metrics are that run's to export) or
        the target is unavailable or not ready (its state is not known then, and the metrics stay)."""
        if live is not None:
            from_version, to_version = live.production_version or "", live.canary_version or ""
        else:  # the state was not read: the registry's aliases name the rollout held
            try:
                aliases = self.registry.aliases()
            except Exception:  # noqa: BLE001 - the row goes without versions
                aliases = {}
            from_version, to_version = aliases.get("production", ""), aliases.get("canary", "")
        event = self._event("hold", from_version=from_version, to_version=to_version, gates=gates, reason=why)
        if live is not None:
            event.from_state = event.to_state = live.describe()
            event.percent = float(live.percent or 0) if live.canary_active else 0.0
        ok = True
        try:
            self.reader().insert_promotion_event(event.row())
        except Exception as e:  # noqa: BLE001
            log.error("could not write the promotion_events row: %s", e)
            ok = False
        if not self.dry_run and live is not None:
            try:
                export_metrics(self.settings, self.registry.aliases(), event.percent)
            except Exception as e:  # noqa: BLE001 - the hold stands; report the gap
                log.error("could not export promotion metrics (Pushgateway/textfile): %s", e)
                ok = False
        return Outcome("hold", why, gates=gates, audit_ok=ok)


def check_or_raise(percent: int) -> None:
    try:
        check_percent(percent)
    except RolloutError as e:
        raise PromotionError(str(e)) from e


def _compared(state: RolloutState) -> dict[str, Any]:
    """What makes two states the same change: versions, URIs and digests (not only what :meth:`describe`
    shows), and the share while a canary runs (without one, a target may not keep a 0 a rollback set)."""
    out = {f.name: getattr(state, f.name) for f in fields(state) if f.compare}
    if not state.canary_active:
        out["percent"] = None
    return out


def _details(row: dict[str, Any]) -> dict[str, Any]:
    """A ``promotion_events`` row's details (empty when not a JSON object)."""
    try:
        details = json.loads(row.get("details") or "{}")
    except (TypeError, ValueError):
        return {}
    return details if isinstance(details, dict) else {}


def _stamped(version_tags: dict[str, dict[str, str]] | None, applied_at: datetime) -> dict[str, dict[str, str]]:
    """``version_tags`` with each :data:`_APPLIED_AT` placeholder set to ``applied_at``."""
    applied = applied_at.isoformat()
    return {
        v: {k: applied if val == _APPLIED_AT else val for k, val in tags.items()}
        for v, tags in (version_tags or {}).items()
    }


def _join(*parts: str) -> str:
    """Reasons joined: the operator's ``--reason`` first, then what the command adds."""
    return "; ".join(p for p in parts if p)


def _join_lines(message: str, notice: str) -> str:
    """An outcome's or error's message, then ``notice`` (what the run did besides) on its own line."""
    return f"{message}\n{notice}" if notice else message


def _rejected(reason: str) -> dict[str, str]:
    """Tags of a version rolled back: no longer a canary (share 0), and why."""
    return {
        STATUS_TAG: "rejected",
        PERCENT_TAG: "0",
        "promotion.rejected_reason": reason[:5000],
        "promotion.rejected_at": _APPLIED_AT,
    }


def _retired(reason: str) -> dict[str, str]:
    """Tags of a version replaced in production (or a canary dropped): share 0, and why."""
    return {
        STATUS_TAG: "retired",
        PERCENT_TAG: "0",
        "promotion.retired_reason": reason[:5000],
        "promotion.retired_at": _APPLIED_AT,
    }
