"""Deployment slots in one server: ``production`` plus an optional ``canary`` with a traffic split.

A slot's model is replaced without a failed request: the new backend is loaded, verified, warmed and
golden-checked beside the old one (in a thread, off the event loop), then swapped in atomically;
the old one is drained (in-flight requests finish) and freed. ``--follow-alias`` and the promotion
CLI's local target (through the admin API in :mod:`predictor.server`) drive these operations.

A slot serving a last-known-good bundle (registry unreachable at load) is flagged in
``motlens_model_fallback`` until the registry answers again: then the flag is cleared if the registry
names the same version, or the reference is loaded afresh if it names another one (``--follow-alias``
does this for production).
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from motlens import MODEL_NAME
from motlens.labels import CANARY_PERCENT_TAG, PROMOTION_STATUS_TAG, SLOTS
from predictor import metrics
from predictor.backend import REGISTRY_UNREACHABLE, Backend, ModelLoadError, record_lkg
from predictor.cache import EmbeddingCache
from predictor.heap import freeze_long_lived, heap_frozen
from predictor.pipeline import ServingUnit
from predictor.settings import ServeSettings

log = logging.getLogger(__name__)

#: Called as ``loader(ref, lkg=settings.lkg_enabled)`` (:func:`predictor.backend.load_backend`).
Loader = Callable[..., Backend]
T = TypeVar("T")

NOT_READY_REASONS = ("no_model", "loading", "load_failed", "golden_failed", "draining")
FALLBACK_REASONS = (REGISTRY_UNREACHABLE,)
#: the least time an admin install waits for the alias to name it (the follower leaves it alone that long)
ADMIN_GRACE_MIN_S = 300.0
#: the first wait of a last-known-good slot before it asks the registry again (doubling, at most 60 s)
FALLBACK_RETRY_S = 1.0


class SlotError(Exception):
    """An admin operation that cannot be applied (e.g. promote without a canary); nothing changed."""


class SlotChanged(Exception):
    """A conditional load found the slot holding something else than it was told to replace."""


#: :meth:`SlotManager.load` without a condition on what the slot holds
ANY_UNIT = object()


@dataclass
class SlotState:
    unit: ServingUnit | None = None
    ref: str | None = None
    loading: str | None = None
    error: str | None = None
    error_kind: str | None = None
    info_labels: tuple[str, ...] | None = None


def _close_abandoned(done: asyncio.Future[ServingUnit]) -> None:
    """A unit loaded for a caller that is gone (shutdown): stop its batcher and free its model."""
    if done.cancelled() or done.exception() is not None:
        return
    unit = done.result()
    log.info("freeing version %s, loaded after its caller was cancelled", unit.version)
    threading.Thread(target=unit.close, name=f"motlens-free-{unit.version}", daemon=True).start()


class SlotManager:
    """Owns the served units, picks one per request, and swaps them safely."""

    def __init__(self, settings: ServeSettings, cache: EmbeddingCache, loader: Loader) -> None:
        self.settings = settings
        self.cache = cache
        self._loader = loader
        self.slots: dict[str, SlotState] = {s: SlotState() for s in SLOTS}
        self.canary_percent = 0.0
        self.draining = False
        self._locks: dict[str, asyncio.Lock] = {s: asyncio.Lock() for s in SLOTS}
        self._rng = random.Random()
        self._reason_label: str | None = None
        self._confirming: set[asyncio.Task[None]] = set()
        # (version, when) production got through the admin API (promote, load): the follower leaves it
        # alone until the alias catches up (the promotion CLI moves the target first, then the alias)
        self._admin_install: tuple[str, float] | None = None
        # (admin-installed production version, the alias's version) when its grace ran out: the follower's
        # switch back to that alias version is a revert, not an alias move (its row says so)
        self._grace_expired: tuple[str | None, str] | None = None
        self.follow_polls = 0  # alias polls completed by follow() (each one resolved and acted on, or failed)
        self.alias_checks = 0  # registry lookups of :meth:`_await_alias` (an admin install without a follower)
        #: when each slot's current model started serving (the swap)
        self.served_since: dict[str, datetime] = {}
        #: called (in a thread) with the promotion_events row of each change of what is served (predictor.events)
        self.on_event: Callable[[dict[str, Any]], Any] | None = None
        self._writing: set[asyncio.Task[None]] = set()  # audit rows being written
        self._lkg_alias: dict[str, str] = {}  # alias → the version its last-known-good record names (this process)
        # Every load (and so every batcher and runtime thread) starts from this one thread, which
        # keeps the process's own priority when the event loop is niced (predictor.priority).
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix="motlens-load")
        # Registry lookups run on threads of their own, not the loop's default executor, which
        # asyncio.run waits for without a timeout: a registry that never answers would hold a stopped server.
        self._registry_threads = ThreadPoolExecutor(4, thread_name_prefix="motlens-registry")
        self._running = 0  # loads and registry lookups inside those threads (see calls_running)
        self._running_lock = threading.Lock()
        for slot in SLOTS:
            self._export_fallback(slot, None)
        self._update_readiness()

    # ------------------------------------------------------------ serving

    @property
    def ready(self) -> bool:
        """What readiness probes see: false while draining, so traffic moves away."""
        return not self.draining and self.serving

    @property
    def serving(self) -> bool:
        """A production model is loaded (requests are still answered while draining)."""
        return self.slots["production"].unit is not None

    def not_ready_reason(self) -> tuple[str, str] | None:
        """(metric label, human detail) while not ready, else None."""
        prod = self.slots["production"]
        if self.draining:
            return "draining", "server is shutting down"
        if prod.unit is not None:
            return None
        if prod.loading:
            return "loading", f"loading {prod.loading}"
        if prod.error:
            return prod.error_kind or "load_failed", prod.error
        return "no_model", "no production model loaded"

    def acquire(self, version: str | None = None) -> ServingUnit | None:
        """The unit for the next request: the canary with probability canary_percent/100, else
        production; with ``version``, the slot serving that version (None if no slot does)."""
        canary = self.slots["canary"].unit
        unit = self.slots["production"].unit
        if version:
            unit = next((u for u in (unit, canary) if u is not None and u.version == version), None)
        elif canary is not None and self._rng.random() * 100.0 < self.canary_percent:
            unit = canary
        if unit is not None:
            unit.acquire()
        return unit

    def served_versions(self) -> list[str]:
        return [st.unit.version for st in self.slots.values() if st.unit is not None]

    def start_model_thread(self) -> None:
        """Start the load thread now (before the caller changes its own priority)."""
        self._model_thread.submit(lambda: None).result()

    @property
    def calls_running(self) -> int:
        """Model loads and registry lookups running in this manager's threads; after :meth:`shutdown`,
        those left to finish (neither can be interrupted)."""
        return self._running

    def _counted(self, fn: Callable[..., T], *args: Any) -> T:
        with self._running_lock:
            self._running += 1
        try:
            return fn(*args)
        finally:
            with self._running_lock:
                self._running -= 1

    async def _ask_registry(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` (a registry lookup) on the registry threads."""
        return await asyncio.get_running_loop().run_in_executor(self._registry_threads, self._counted, fn, *args)

    def _new_unit(self, slot: str, ref: str) -> ServingUnit:
        backend = self._loader(ref, lkg=self.settings.lkg_enabled)
        return ServingUnit(backend, self.settings, self.cache, slot)

    # ------------------------------------------------------------ operations

    async def load(self, slot: str, ref: str, *, cause: str = "start", holding: object = ANY_UNIT) -> dict[str, Any]:
        """Load ``ref`` into ``slot`` beside the current model, swap, drain and free the old one.
        ``cause`` is recorded: ``admin`` (the admin API, see :meth:`follow`),
        ``start``, ``restore`` (a running canary), ``registry_back`` (a fallback's reference moved),
        ``follow`` (whose own row :meth:`follow` writes). ``holding``: load only if the slot still
        holds that unit (``None``: is still empty) once this load has the slot, else raise
        :class:`SlotChanged` and load nothing (a retry must not replace what the admin API put there
        while it waited for the slot)."""
        if slot not in self.slots:
            raise SlotError(f"unknown slot {slot!r}; expected one of {', '.join(SLOTS)}")
        state = self.slots[slot]
        async with self._locks[slot]:
            if holding is not ANY_UNIT and state.unit is not holding:
                raise SlotChanged(slot)
            state.loading = ref
            self._update_readiness()
            loop = asyncio.get_running_loop()
            pending = loop.run_in_executor(self._model_thread, self._counted, self._new_unit, slot, ref)
            try:
                unit = await asyncio.shield(pending)  # a cancelled caller leaves the load to finish
            except asyncio.CancelledError:  # shutdown mid-load: the load thread finishes; free what it built
                pending.add_done_callback(_close_abandoned)
                state.loading = None
                self._update_readiness()
                raise
            except ModelLoadError as e:
                state.loading, state.error = None, str(e)
                state.error_kind = "golden_failed" if e.golden is not None else "load_failed"
                metrics.MODEL_LOAD_FAILURES.labels(slot=slot, reason=state.error_kind).inc()
                if e.golden is not None and state.unit is None:  # a serving slot keeps its own figures
                    metrics.GOLDEN_MIN_COSINE.labels(slot=slot).set(e.golden.min_cosine)
                    metrics.GOLDEN_PASSED.labels(slot=slot).set(0)
                log.error("%s slot: cannot serve %s: %s", slot, ref, e)
                self._update_readiness()
                raise
            except BaseException:
                state.loading = None
                self._update_readiness()
                raise
            backend = unit.backend
            if self.settings.gc_freeze and not heap_frozen():
                self._freeze_heap(unit)  # once per process, before the first model serves
            old = state.unit
            state.unit, state.ref, state.loading, state.error, state.error_kind = unit, ref, None, None, None
            if slot == "canary" and cause == "admin" and old is not None and old.version != unit.version:
                self.set_canary_percent(0.0, cause="new_canary")  # a version no one has judged starts dark
            self.served_since[slot] = datetime.now(UTC)
            if cause == "admin" and slot == "production":
                self._admin_install = (unit.version, time.monotonic())
                self._watch_alias(unit, ref)
            self._export_unit(slot, unit)
            self._update_readiness()
            log.info(
                "%s slot now serves %s version %s (%d batcher worker(s), buckets of <= %d tokens%s)",
                slot, backend.name, backend.version, unit.batcher.workers_alive, unit.batcher.max_tokens,
                ", packed rows" if backend.packs else "",
            )  # fmt: skip
            if backend.fallback:
                log.warning(
                    "%s slot serves the LAST-KNOWN-GOOD bundle of %s (version %s; %s); retrying the registry",
                    slot,
                    ref,
                    backend.version,
                    backend.fallback,
                )
                if not (slot == "production" and self.settings.follow_alias):  # follow() confirms it
                    task = asyncio.create_task(self._confirm_fallback(slot, unit, ref), name=f"confirm-{slot}")
                    self._confirming.add(task)
                    task.add_done_callback(self._confirming.discard)
            if cause != "follow":
                self._record(
                    "serve_load", slot, old.version if old else None, unit.version,
                    _load_reason(cause, slot, ref, old, backend), ts=self.served_since[slot],
                    ref=ref, cause=cause, fallback=backend.fallback,
                )  # fmt: skip
        await self._settle(old)
        return self.status()

    async def load_with_retry(self, slot: str, ref: str, max_backoff_s: float = 60.0) -> bool:
        """Keep trying to load (registry down at start, …) with exponential backoff until it works;
        False (and no load) once something else filled the slot meanwhile (the admin API, the
        follower): a later retry would silently replace what that put there."""
        delay = 1.0
        while True:
            try:
                await self.load(slot, ref, holding=None)
                return True
            except ModelLoadError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, max_backoff_s)
            except SlotChanged:
                pass
            if (unit := self.slots[slot].unit) is not None:
                log.info("%s slot serves version %s meanwhile; no longer retrying %s", slot, unit.version, ref)
                return False

    def set_canary_percent(self, percent: float, *, cause: str = "admin") -> dict[str, Any]:
        """The canary's share of traffic; ``cause`` as for :meth:`load` (admin, start, restore)."""
        if not 0.0 <= percent <= 100.0:
            raise SlotError(f"canary percent must be within 0–100, got {percent}")
        if percent > 0 and self.slots["canary"].unit is None:
            raise SlotError("no canary model loaded; load one before sending it traffic")
        before, self.canary_percent = self.canary_percent, float(percent)
        if before != self.canary_percent:
            prod, canary = self.slots["production"].unit, self.slots["canary"].unit
            log.info("canary share %s%% -> %s%% (%s)", before, self.canary_percent, cause)
            self._record(
                "serve_percent", "canary", prod.version if prod else None, canary.version if canary else None,
                f"canary share {before:g}% -> {self.canary_percent:g}% ({_CAUSE_WORDS.get(cause, cause)})",
                cause=cause, previous_percent=before,
            )  # fmt: skip
        return self.status()

    async def promote(self) -> dict[str, Any]:
        """The canary becomes production (100% of traffic); the old production model is drained and freed.
        Only the canary served when it is called: refused while a canary load runs, or if one ran
        while it waited for the slots (what it would promote was never given traffic to judge)."""
        canary, prod = self.slots["canary"], self.slots["production"]
        if canary.loading:
            raise SlotError(f"a canary load ({canary.loading}) is in progress; promote once it has finished")
        expected = canary.unit
        async with self._locks["production"], self._locks["canary"]:
            if canary.unit is None:
                raise SlotError("no canary model loaded; nothing to promote")
            if canary.unit is not expected:
                raise SlotError(
                    f"the canary slot changed while promote waited (it now serves version {canary.unit.version}); "
                    "nothing promoted"
                )
            old = prod.unit
            unit = canary.unit
            unit.slot = "production"
            prod.unit, prod.ref, prod.error, prod.error_kind = unit, canary.ref, None, None
            canary.unit, canary.ref = None, None
            self.served_since["production"] = datetime.now(UTC)
            self.served_since.pop("canary", None)
            self.canary_percent = 0.0
            self._admin_install = (unit.version, time.monotonic())
            self._watch_alias(unit, prod.ref)
            self._export_unit("canary", None)
            self._export_unit("production", unit)
            self._update_readiness()
            log.info("canary version %s promoted to production (was version %s)", unit.version, old and old.version)
            self._record(
                "serve_promote", "production", old.version if old else None, unit.version,
                f"canary version {unit.version} now serves all traffic as production",
                ts=self.served_since["production"],
            )  # fmt: skip
        await self._settle(old)
        return self.status()

    async def rollback(self) -> dict[str, Any]:
        """Send no traffic to the canary (at once, even while a canary load holds the slot) and unload it."""
        self.canary_percent = 0.0
        async with self._locks["canary"]:
            canary = self.slots["canary"]
            self.canary_percent = 0.0
            old, canary.unit, canary.ref = canary.unit, None, None
            canary.error, canary.error_kind = None, None  # an earlier failed load is history now
            self._export_unit("canary", None)
            if old is not None:
                prod = self.slots["production"].unit
                log.info("canary version %s rolled back; production version %s serves all traffic", old.version,
                         prod and prod.version)  # fmt: skip
                self._record(
                    "serve_rollback", "canary", old.version, prod.version if prod else None,
                    f"canary version {old.version} unloaded; production serves all traffic",
                )  # fmt: skip
        await self._settle(old)
        return self.status()

    async def follow(self, alias: str, interval_s: float) -> None:
        """Poll the registry alias; when it names another version, swap production to that version.
        Without ``--canary``, the first polls also restore the canary the registry records as running."""
        from training.registry import Registry

        registry = await self._ask_registry(Registry)
        refused: set[str] = set()
        retry_at: dict[str, tuple[float, float]] = {}  # version → (next attempt, backoff) after a transient failure
        restore = not self.settings.canary
        while True:
            try:
                if restore:
                    restore = not await self._restore_canary(registry)
                info = await self._ask_registry(registry.resolve, f"models:/{MODEL_NAME}@{alias}")
                prod = self.slots["production"]
                current = prod.unit.version if prod.unit else None
                if prod.unit is not None and prod.unit.backend.fallback and _confirms(info, prod.unit):
                    self._clear_fallback(prod.unit)
                if current == info.version and prod.unit is not None:
                    await self._keep_lkg(alias, prod.unit)
                if self._installed_by_admin(current, info.version, grace_s=self._admin_grace_s()):
                    pass  # the alias has not caught up with a promote or load through the admin API yet
                elif (
                    not prod.loading
                    and info.version not in refused
                    and current != info.version
                    and time.monotonic() >= retry_at.get(info.version, (0.0, 0.0))[0]
                ):
                    reverts = self._grace_expired == (current, info.version)
                    if reverts:
                        log.info("alias %s still names version %s, not version %s of the admin API: switching "
                                 "production back", alias, info.version, current)  # fmt: skip
                    else:
                        log.info("alias %s now names version %s; switching production", alias, info.version)
                    ref = f"models:/{MODEL_NAME}/{info.version}"
                    was_fallback = prod.unit is not None and bool(prod.unit.backend.fallback)
                    try:
                        await self.load("production", ref, cause="follow")
                    except ModelLoadError as e:
                        if e.transient:  # the registry or artifact store did not answer: again, later
                            backoff = min(2 * retry_at.get(info.version, (0.0, interval_s / 2))[1], 600.0)
                            retry_at[info.version] = (time.monotonic() + backoff, backoff)
                        else:  # refused on its merits (verification, golden set, backend): recorded once
                            refused.add(info.version)
                            self._grace_expired = None
                            await self._record_refused(alias, current, info.version, ref, str(e))
                    else:
                        self._grace_expired = None
                        unit = self.slots["production"].unit
                        grace = self._admin_grace_s() if reverts else None
                        await self._record_follow(alias, current, unit, ref, was_fallback, grace)
                        if unit is not None:
                            await self._keep_lkg(alias, unit)
            except Exception as e:  # noqa: BLE001 - registry down: keep serving, retry next poll
                log.warning("cannot resolve alias %s: %s", alias, e)
            self.follow_polls += 1
            await asyncio.sleep(interval_s)

    async def _record_follow(
        self,
        alias: str,
        previous: str | None,
        unit: ServingUnit | None,
        ref: str,
        replaced_fallback: bool,
        reverted_after_s: float | None = None,
    ) -> None:
        """The audit row of a follower switch (``on_event``; never raises: serving goes on);
        ``reverted_after_s``: the alias never moved, it undid an admin install after its grace."""
        if self.on_event is None or unit is None:
            return
        from predictor.events import follow_row

        since = self.served_since.get("production") or datetime.now(UTC)
        row = follow_row(
            alias, previous, unit.version, since, ref, percent=self.canary_percent,
            replaced_fallback=replaced_fallback, reverted_after_s=reverted_after_s,
        )  # fmt: skip
        await self._write(row)

    async def _record_refused(self, alias: str, serving: str | None, version: str, ref: str, why: str) -> None:
        """The audit row of a follower switch refused on its merits (``on_event``; never raises)."""
        if self.on_event is None:
            return
        from predictor.events import refused_row

        await self._write(refused_row(alias, serving, version, ref, why, percent=self.canary_percent))

    def _record(
        self, action: str, slot: str, from_version: str | None, to_version: str | None, reason: str, **kw: Any
    ) -> None:
        """Write the audit row of a change of what is served, in the background (:meth:`flush_records`)."""
        if self.on_event is None:
            return
        from predictor.events import server_row

        row = server_row(
            action, slot=slot, from_version=from_version, to_version=to_version, percent=self.canary_percent,
            reason=reason, **kw,
        )  # fmt: skip
        task = asyncio.get_running_loop().create_task(self._write(row), name=f"record-{action}")
        self._writing.add(task)
        task.add_done_callback(self._writing.discard)

    async def _write(self, row: dict[str, Any]) -> None:
        assert self.on_event is not None
        try:
            await asyncio.to_thread(self.on_event, row)
        except Exception as e:  # noqa: BLE001 - the recorder logs its own failures; this is a last guard
            log.warning("cannot record the %s row (version %s): %s", row.get("action"), row.get("to_version"), e)

    async def flush_records(self) -> None:
        """Wait until every audit row handed to :meth:`_record` is recorded: with the server's prediction-log
        writer, in its spool (it stores the rows, within its close's budget at shutdown), else written or
        failed."""
        while self._writing:
            await asyncio.gather(*list(self._writing), return_exceptions=True)

    async def _keep_lkg(self, alias: str, unit: ServingUnit) -> None:
        """The alias names the version production serves: make its last-known-good record name that
        version too. Production may have changed through the admin API (a promotion CLI's local target)
        with the alias following later; a record left naming the former version would make a restart
        during a registry outage serve that one (rolled back, perhaps rejected since)."""
        if not self.settings.lkg_enabled or unit.backend.fallback or self._lkg_alias.get(alias) == unit.version:
            return
        await asyncio.to_thread(record_lkg, f"models:/{MODEL_NAME}@{alias}", unit.backend.bundle)
        self._lkg_alias[alias] = unit.version

    def _watch_alias(self, unit: ServingUnit, ref: str | None) -> None:
        """Production got ``unit`` (from ``ref``) through the admin API and no follower runs: watch the
        alias the server started on (``--model models:/mot-defects@ALIAS``) in the background until it
        names ``unit``, then make the alias's last-known-good record name it too (:meth:`_keep_lkg`)."""
        from training.registry import ref_alias

        alias = ref_alias(self.settings.model, MODEL_NAME)
        if alias is None or self.settings.follow_alias or not self.settings.lkg_enabled:
            return  # a follower keeps the record itself; a path or a pinned version has none
        if not (ref or "").startswith("models:/"):
            return  # a local bundle: not the registry's, so no alias names it
        task = asyncio.get_running_loop().create_task(self._await_alias(alias, unit), name="confirm-alias")
        self._confirming.add(task)
        task.add_done_callback(self._confirming.discard)

    async def _await_alias(self, alias: str, unit: ServingUnit) -> None:
        """Look the alias up every ``follow_interval_s`` while ``unit`` serves production, for at most
        the follower's grace for an admin install (:meth:`_admin_grace_s`)."""
        from training.registry import Registry

        interval, grace_s = self.settings.follow_interval_s, self._admin_grace_s()
        deadline = time.monotonic() + grace_s
        registry: Registry | None = None
        while self.slots["production"].unit is unit:
            try:
                if registry is None:
                    registry = await self._ask_registry(Registry)
                info = await self._ask_registry(registry.resolve, f"models:/{MODEL_NAME}@{alias}")
            except Exception as e:  # noqa: BLE001 - registry down or alias missing: look again later
                log.debug("cannot resolve alias %s: %s", alias, e)
                info = None
            self.alias_checks += 1
            if info is not None and _confirms(info, unit):
                if self.slots["production"].unit is unit:
                    await self._keep_lkg(alias, unit)
                return
            if time.monotonic() >= deadline:
                log.info(
                    "alias %s does not name version %s (production since the admin API) after %.0f s; "
                    "its last-known-good record is left as it was", alias, unit.version, grace_s,
                )  # fmt: skip
                return
            await asyncio.sleep(interval)

    async def _restore_canary(self, registry: Any) -> bool:
        """Load the canary the registry records as running (alias ``canary`` on a version tagged
        ``promotion.status=canary`` with ``promotion.canary_percent`` > 0) at that percent, unless the
        canary slot is in use. True once settled; False to try again at the next poll (transient failure)."""
        from training.registry import RegistryUnreachable, UnknownModelRef

        canary = self.slots["canary"]
        if canary.unit is not None or canary.loading:
            return True  # the admin API got there first: it leads
        try:
            info = await self._ask_registry(registry.resolve, f"models:/{MODEL_NAME}@canary")
        except RegistryUnreachable as e:
            log.warning("cannot read the registry's canary yet: %s", e)
            return False
        except UnknownModelRef:
            return True  # no canary alias (or an incomplete version): nothing to restore
        percent = _recorded_percent(info.tags)
        if percent is None:
            return True
        if canary.unit is not None or canary.loading:  # an admin load came during the lookup: it leads
            return True  # (one that comes later waits for this load's slot lock and replaces it)
        log.info("restoring canary version %s at %s%%, as the registry records it", info.version, percent)
        try:
            await self.load("canary", f"models:/{MODEL_NAME}/{info.version}", cause="restore")
        except ModelLoadError as e:  # logged by load(); the reason shows in the canary slot's status
            return not e.transient
        if self.slots["canary"].unit is not None and self.canary_percent == 0.0:
            self.set_canary_percent(percent, cause="restore")
        return True

    def _admin_grace_s(self) -> float:
        """How long an admin install waits for the alias to name it: max(10 polls, ``ADMIN_GRACE_MIN_S``)."""
        return max(10 * self.settings.follow_interval_s, ADMIN_GRACE_MIN_S)

    def _installed_by_admin(self, current: str | None, aliased: str, grace_s: float) -> bool:
        """Whether production serves what the admin API put there and the alias has not caught up
        (within ``grace_s``; after that the registry is the truth again)."""
        pin = self._admin_install
        if pin is None or pin[0] != current:
            return False
        if aliased == current or time.monotonic() - pin[1] > grace_s:
            self._admin_install = None
            self._grace_expired = (current, aliased) if aliased != current else None  # the follow row says so
            return False
        log.debug("production serves version %s from the admin API; waiting for the alias (now %s)", current, aliased)
        return True

    def begin_drain(self) -> None:
        """Report not ready from now on (requests already routed here are still served)."""
        self.draining = True
        self._update_readiness()

    async def shutdown(self) -> None:
        """Mark not ready, drain and free every unit; every audit row written."""
        self.begin_drain()
        for task in list(self._confirming):
            task.cancel()
        prod, canary = self.slots["production"].unit, self.slots["canary"].unit
        if prod is not None or canary is not None:
            self._record(
                "serve_stop", "production", prod.version if prod else None, canary.version if canary else None,
                "server stopped: "
                + ", ".join(f"{s} version {u.version}" for s, u in (("production", prod), ("canary", canary)) if u)
                + " no longer served",
            )  # fmt: skip
        for slot in SLOTS:
            state = self.slots[slot]
            unit, state.unit = state.unit, None
            if unit is not None:
                self._export_unit(slot, None)
                await self._retire(unit)
        await self.flush_records()
        for threads in (self._model_thread, self._registry_threads):  # queued work does not start
            threads.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ internals

    async def _confirm_fallback(self, slot: str, unit: ServingUnit, ref: str, max_backoff_s: float = 60.0) -> None:
        """While ``unit`` serves the last-known-good bundle of ``ref`` in ``slot``, ask the registry with backoff
        (:data:`FALLBACK_RETRY_S`, doubling up to ``max_backoff_s``) until it names a version: the same one
        clears the fallback, another one is loaded afresh. Anything else (no answer, an answer that names
        no version: a proxy's error page, the alias unset during the outage, a transient fetch failure of
        the new version) is asked again, logged when it first happens and when its kind changes."""
        from training.registry import Registry, RegistryUnreachable

        delay, failing = FALLBACK_RETRY_S, ""
        while True:
            await asyncio.sleep(delay)
            if self._slot_of(unit) != slot:
                return  # replaced, or moved by a promote: ``ref`` is no longer what its slot serves
            delay = min(delay * 2, max_backoff_s)
            try:
                info = await self._ask_registry(lambda: Registry().resolve(ref))
            except Exception as e:  # noqa: BLE001 - no version named: keep serving, flagged, and ask again
                level = logging.DEBUG
                if type(e).__name__ != failing:  # the first failure, or another kind of it
                    failing = type(e).__name__
                    level = logging.WARNING if isinstance(e, RegistryUnreachable) else logging.ERROR
                log.log(level, "keeping the last-known-good version %s for %s (still flagged; asking the registry "
                        "again with backoff): %s", unit.version, ref, e)  # fmt: skip
                continue
            if self._slot_of(unit) != slot:
                return  # (while the registry was asked)
            if _confirms(info, unit):
                self._clear_fallback(unit)
                return
            log.warning("registry reachable: %s names version %s, not %s; loading it", ref, info.version, unit.version)
            try:
                await self.load(slot, ref, cause="registry_back", holding=unit)
            except ModelLoadError as e:  # logged by load(); the last-known-good version keeps serving, flagged
                if e.transient:  # the registry or artifact store stopped answering: ask again
                    failing = type(e).__name__
                    continue
            except SlotChanged:
                pass  # replaced meanwhile (the admin API): nothing to confirm any more
            return

    def _slot_of(self, unit: ServingUnit) -> str | None:
        return next((slot for slot, st in self.slots.items() if st.unit is unit), None)

    def _clear_fallback(self, unit: ServingUnit) -> None:
        unit.backend.fallback = None
        slot = self._slot_of(unit)
        if slot is not None:
            self._export_fallback(slot, None)
            self._record(
                "serve_fallback_cleared", slot, unit.version, unit.version,
                f"registry reachable again and names version {unit.version}: no longer a last-known-good fallback",
            )  # fmt: skip
        log.info("registry reachable again and names version %s: no longer a last-known-good fallback", unit.version)

    def _export_fallback(self, slot: str, reason: str | None) -> None:
        for r in FALLBACK_REASONS:
            metrics.MODEL_FALLBACK.labels(slot=slot, reason=r).set(1 if r == reason else 0)

    def _freeze_heap(self, new: ServingUnit) -> None:
        """Freeze the long-lived heap (predictor.heap): one full collection, on the event loop, before
        ``new`` serves. Every model alive now is in the frozen heap (Backend.close treats it so); models
        loaded later are not, so no later swap needs a full pass."""
        freeze_long_lived()
        for unit in [new, *(st.unit for st in self.slots.values() if st.unit is not None)]:
            unit.backend.in_frozen_heap = True

    async def _settle(self, old: ServingUnit | None) -> None:
        """After a slot change: retire the unit it replaced (its close collects its garbage without a
        pass over the frozen heap, predictor.heap)."""
        if old is not None:
            await self._retire(old)

    async def _retire(self, unit: ServingUnit) -> None:
        if not await unit.drain(self.settings.grace_period_s):
            log.warning(
                "version %s still had %d requests after %ss; freeing it anyway",
                unit.version,
                unit.inflight,
                self.settings.grace_period_s,
            )
        await asyncio.to_thread(unit.close)
        if all(s.unit is None or s.unit.version != unit.version for s in self.slots.values()):
            self.cache.purge_version(unit.version)
        log.info("retired version %s", unit.version)

    def _export_unit(self, slot: str, unit: ServingUnit | None) -> None:
        state = self.slots[slot]
        if state.info_labels is not None:
            metrics.clear_model_info(state.info_labels)
            state.info_labels = None
        metrics.MODEL_READY.labels(slot=slot).set(0 if unit is None else 1)
        self._export_fallback(slot, None if unit is None else unit.backend.fallback)
        if unit is None:
            return
        be = unit.backend
        state.info_labels = (be.name, be.version, be.run_id, be.backend_name, be.device, slot)
        metrics.set_model_info(state.info_labels)
        if be.device.startswith("cuda"):
            metrics.watch_cuda_device(be.device)
        metrics.MODEL_LOAD_SECONDS.labels(slot=slot).set(be.load_seconds)
        if be.golden is not None:
            metrics.GOLDEN_MIN_COSINE.labels(slot=slot).set(be.golden.min_cosine)
            metrics.GOLDEN_PASSED.labels(slot=slot).set(1 if be.golden.passed else 0)

    def _update_readiness(self) -> None:
        reason = self.not_ready_reason()
        label = reason[0] if reason else None
        if label != self._reason_label:
            if label:  # the new reason first: a scrape between the two never sees a not-ready pod at 0
                metrics.MODEL_NOT_READY.labels(reason=label).set(1)
            for r in NOT_READY_REASONS:
                if r != label:
                    metrics.MODEL_NOT_READY.labels(reason=r).set(0)
            if reason:
                log.warning("model not ready: %s", reason[1])
            else:
                log.info("model ready")
            self._reason_label = label

    def status(self) -> dict[str, Any]:
        reason = self.not_ready_reason()
        out: dict[str, Any] = {
            "ready": self.ready,
            "reason": reason[1] if reason else None,
            "canary_percent": self.canary_percent,
            "slots": {},
        }
        for slot, st in self.slots.items():
            be = st.unit.backend if st.unit else None
            out["slots"][slot] = {
                "ref": st.ref,
                "version": be.version if be else None,
                "run_id": be.run_id if be else None,
                "backend": be.backend_name if be else None,
                "device": be.device if be else None,
                "golden_min_cosine": be.golden.min_cosine if be and be.golden else None,
                "fallback": be.fallback if be else None,
                "loading": st.loading,
                "error": st.error,
                "inflight": st.unit.inflight if st.unit else 0,
            }
        return out


def _recorded_percent(tags: dict[str, str]) -> float | None:
    """The share of an active canary as the promotion CLI tagged it; None unless it is one (> 0)."""
    if tags.get(PROMOTION_STATUS_TAG) != "canary":
        return None
    try:
        percent = float(tags.get(CANARY_PERCENT_TAG, ""))
    except ValueError:
        return None
    return percent if 0.0 < percent <= 100.0 else None


_CAUSE_WORDS = {
    "admin": "through the admin API",
    "start": "at start",
    "restore": "restored as the registry records it",
    "registry_back": "the registry answered again and names another version",
    "new_canary": "another version loaded into the canary slot through the admin API starts with no traffic",
}


def _load_reason(cause: str, slot: str, ref: str, old: ServingUnit | None, backend: Backend) -> str:
    """The ``reason`` of a ``serve_load`` row."""
    text = f"{slot} slot loaded {ref} {_CAUSE_WORDS.get(cause, cause)}"
    if old is not None and old.backend.fallback and cause == "registry_back":
        text += f"; replaced the last-known-good version {old.version}"
    if backend.fallback:
        text += f"; serves its LAST-KNOWN-GOOD bundle ({backend.fallback})"
    return text


def _confirms(info: Any, unit: ServingUnit) -> bool:
    """The registry's answer (a ``ModelVersionInfo``) names the version and run ``unit`` serves."""
    return bool(info.version == unit.version and (not info.run_id or info.run_id == unit.backend.run_id))
