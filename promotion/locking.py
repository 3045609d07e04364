"""Mutual exclusion for promotion runs, so two runs (two CronJob pods, two people) never step twice.

Local and GitOps targets: an ``fcntl.flock`` on a path (the overlay directory, or a lock file in the
state directory); the kernel drops it when the process dies, so a crashed run never wedges the next.
Kubernetes: a ``coordination.k8s.io/v1`` Lease next to the InferenceService, taken and released with
``resourceVersion`` preconditions (optimistic concurrency), renewed every ``lease_seconds / 3`` while
held, so a killed pod's lease lapses. Its ``renewTime`` comes from the holder's clock: a run takes a
held Lease over only once it has seen it unchanged for the lease duration by its own monotonic clock,
or once its renewal is older than the duration plus a clock-skew allowance (:func:`lease_lock`).
"""

from __future__ import annotations

import copy
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class LockBusy(RuntimeError):
    """Another promotion run holds the lock."""


class LockLost(RuntimeError):
    """This run held the lock and lost it (another run took the Lease over while this one ran)."""


class HeldLease:
    """What :func:`lease_lock` yields: whether the Lease is still this run's.

    ``lost`` turns true when a renewal finds the Lease held by another run. :meth:`check` raises
    :class:`LockLost` then, and also once no renewal has succeeded for ``renew_deadline_s`` (another
    run may take a Lease over that is not renewed, whatever made the renewals fail), so a caller
    refuses to change anything more (client-go's renew deadline)."""

    def __init__(self, namespace: str, name: str, renew_deadline_s: float) -> None:
        self.namespace, self.name = namespace, name
        self.lost_to: str | None = None
        self.renew_deadline_s = renew_deadline_s
        self.renewed_at = time.monotonic()

    @property
    def lost(self) -> bool:
        return self.lost_to is not None

    def raise_if_lost(self) -> None:
        if self.lost_to is not None:
            raise LockLost(
                f"lost the Lease {self.namespace}/{self.name} to {self.lost_to} while this run held it: "
                "another run may have changed the rollout meanwhile; run `motlens promote status`"
            )

    def check(self) -> None:
        """Raise :class:`LockLost` unless the Lease is this run's and renewed within its deadline."""
        self.raise_if_lost()
        stale = time.monotonic() - self.renewed_at
        if stale > self.renew_deadline_s:
            raise LockLost(
                f"the Lease {self.namespace}/{self.name} has not been renewed for {stale:.0f} s (renew deadline "
                f"{self.renew_deadline_s:.0f} s): another run may take it over, so this run changes nothing more; "
                "run `motlens promote status`"
            )


@contextmanager
def file_lock(path: Path, *, blocking: bool, timeout_s: float = 60.0) -> Iterator[None]:
    """Exclusive flock on ``path`` (a directory or a file, created if missing)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
    fd = os.open(path, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not blocking or time.monotonic() >= deadline:
                    raise LockBusy(f"another promotion run holds the lock on {path}") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def holder_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _now() -> datetime:
    return datetime.now(UTC)


def _fmt(ts: datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(ts: str | None) -> datetime | None:
    if not ts:
        return None
    try:
        parsed = datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None  # unreadable: as if never renewed
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _busy(held: dict[str, Any], age: float | None, duration: float, clock_skew_s: float, blocking: bool) -> str:
    """Why a held Lease is not taken over, when its renewTime alone would say it has lapsed."""
    if age is not None and age < -60:
        return f"; its renewTime {held.get('renewTime')} is {-age:.0f} s ahead of this host's clock (clocks disagree)"
    if age is None or age <= duration:
        return ""
    head = f"; its renewTime {held.get('renewTime')} is {age:.0f} s old by this host's clock: past its {duration:g} s"
    if blocking:
        return f"{head}, but this run saw it renewed (the holder's clock may run behind this one's)"
    return (
        f"{head}, but a run that does not wait takes a Lease over only past {duration:g} + {clock_skew_s:g} s "
        "(MOTLENS_PROMOTE_CLOCK_SKEW_S), as the holder's clock may run behind this one's; a manual command "
        f"takes it over once it has seen it unchanged for {duration:g} s"
    )


CLOCK_SKEW_S = 600.0


@contextmanager
def lease_lock(
    api: Any,
    namespace: str,
    name: str,
    *,
    lease_seconds: int,
    blocking: bool,
    timeout_s: float = 60.0,
    clock_skew_s: float = CLOCK_SKEW_S,
) -> Iterator[HeldLease]:
    """Hold the Lease ``name`` (created on first use) through ``CustomObjectsApi`` ``api``.

    Another holder's ``renewTime`` was written by *its* clock, so it is never compared with this
    host's clock alone. A held Lease is taken over only when

    - this run has watched the same record (holder, ``renewTime``, ``resourceVersion``) stay
      unchanged for its ``leaseDurationSeconds``, timed by this host's monotonic clock (what
      client-go's leader election does; only a ``blocking`` run watches), or
    - by this host's clock its last renewal is older than ``leaseDurationSeconds + clock_skew_s``:
      safe while the holder's clock runs at most ``clock_skew_s + 2 * lease_seconds / 3`` behind
      this one's (a live holder seen just before its next renewal, ``lease_seconds / 3`` after its
      last: 800 s with the defaults). This is how a non-blocking run (``auto``, one
      look, no waiting) gets a lease a killed pod left.

    ``blocking``: wait up to ``timeout_s``; past it, keep waiting only while the record has not
    changed since the first look (a stalled holder: its lease lapses by the first rule at most
    ``leaseDurationSeconds`` after that look), and give up as soon as it is seen renewed.

    Yields a :class:`HeldLease`. A renewal refused with 409 (a renewal the server applied but whose
    reply was lost, or any other edit) re-reads the Lease: still this run's, it is renewed with the
    fresh ``resourceVersion``; held by another run (this run's renewals failed for longer than the
    lease and it was taken over), the loss is logged as an ERROR, renewals stop, the Lease is left
    to its new holder and :class:`LockLost` is raised at exit (unless the body raised already).
    """
    from kubernetes.client.exceptions import ApiException

    me = holder_identity()
    group, version, plural = "coordination.k8s.io", "v1", "leases"
    started = time.monotonic()
    first_record: tuple[Any, ...] | None = None
    record: tuple[Any, ...] | None = None
    record_since = started  # when (monotonic) this run first saw the current record
    duration = float(lease_seconds)  # the held Lease's, once one was read (a lost create race reads none)
    lost_create = False

    def spec() -> dict[str, Any]:
        now = _fmt(_now())
        return {
            "holderIdentity": me,
            "leaseDurationSeconds": lease_seconds,
            "acquireTime": now,
            "renewTime": now,
        }

    while True:
        try:
            lease = api.get_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as e:
            if e.status != 404:
                raise
            lease = None
        busy = ""
        try:
            if lease is None:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name},
                    "spec": spec(),
                }
                try:
                    lease = api.create_namespaced_custom_object(group, version, namespace, plural, body)
                    break
                except ApiException as e:
                    if e.status != 409 or lost_create:
                        raise
                    lost_create = True  # another run created it first: look at what it wrote, at once
                    continue
            held = lease.get("spec") or {}
            duration = float(held.get("leaseDurationSeconds") or lease_seconds)
            seen = (
                held.get("holderIdentity"),
                held.get("renewTime"),
                held.get("leaseDurationSeconds"),
                (lease.get("metadata") or {}).get("resourceVersion"),
            )
            if seen != record:
                record, record_since = seen, time.monotonic()
                first_record = first_record or seen
            watched = time.monotonic() - record_since
            renewed = _parse(held.get("renewTime"))
            age = (_now() - renewed).total_seconds() if renewed else None
            if not held.get("holderIdentity"):
                why = "free"
            elif age is None:
                why = "held without a renewTime"
            elif age > duration + clock_skew_s:
                why = f"last renewed {age:.0f} s ago by this host's clock (> {duration:g} + {clock_skew_s:g} s)"
            elif blocking and watched >= duration:
                why = f"unchanged for {watched:.0f} s (≥ its {duration:g} s) while this run watched it"
            else:
                why = ""
                busy = _busy(held, age, duration, clock_skew_s, blocking)
            if why:
                if held.get("holderIdentity"):
                    log.warning(
                        "taking over Lease %s/%s from %s: %s", namespace, name, held["holderIdentity"], why
                    )
                transitions = (held.get("leaseTransitions") or 0) + 1
                mine = {**lease, "spec": {**held, **spec(), "leaseTransitions": transitions}}
                lease = api.replace_namespaced_custom_object(group, version, namespace, plural, name, mine)
                break  # (on a 409 ``lease`` is still the one read: the busy message names its holder)
        except ApiException as e:
            if e.status != 409:  # 409: another run created or took it first
                raise
        elapsed = time.monotonic() - started
        stalled = record == first_record and time.monotonic() - record_since < duration + 2.0
        if not blocking or (elapsed >= timeout_s and not stalled):
            holder = (lease or {}).get("spec", {}).get("holderIdentity") or "another run"
            raise LockBusy(f"Lease {namespace}/{name} is held by {holder}{busy}")
        time.sleep(1.0)
    held_lease = [lease]
    handle = HeldLease(namespace, name, renew_deadline_s=lease_seconds * 2 / 3)
    guard = threading.Lock()
    stop = threading.Event()

    def replace_ours(body: dict[str, Any]) -> dict[str, Any] | None:
        """Replace the Lease with ``body``; on 409 re-read it and, while it is still this run's, retry
        once with the fresh resourceVersion. None (and ``handle`` flagged) when another run holds it."""
        try:
            return api.replace_namespaced_custom_object(group, version, namespace, plural, name, body)
        except ApiException as e:
            if e.status != 409:
                raise
        fresh = api.get_namespaced_custom_object(group, version, namespace, plural, name)
        holder = (fresh.get("spec") or {}).get("holderIdentity")
        if holder != me:
            handle.lost_to = holder or "nobody (released by another run)"
            log.error(
                "lost the Lease %s/%s: it is now held by %s; this run changes nothing more",
                namespace,
                name,
                handle.lost_to,
            )
            return None
        mine = ("holderIdentity", "renewTime")  # what a renewal or the release changes
        fresh["spec"] = {**fresh["spec"], **{k: body["spec"][k] for k in mine}}
        return api.replace_namespaced_custom_object(group, version, namespace, plural, name, fresh)

    def renew() -> None:  # keep renewTime fresh so a run longer than lease_seconds keeps the lock
        while not stop.wait(max(1.0, lease_seconds / 3)):
            with guard:
                body = copy.deepcopy(held_lease[0])
                body["spec"]["renewTime"] = _fmt(_now())
                try:
                    renewed = replace_ours(body)
                except Exception as e:  # noqa: BLE001 - retried next period; expiry is the fallback
                    log.warning("could not renew Lease %s/%s: %s", namespace, name, e)
                    continue
                if renewed is None:
                    return  # lost: stop renewing another run's Lease
                held_lease[0] = renewed
                handle.renewed_at = time.monotonic()

    renewer = threading.Thread(target=renew, name=f"lease-renew-{name}", daemon=True)
    renewer.start()
    try:
        yield handle
    finally:
        stop.set()
        renewer.join()
        if not handle.lost:
            lease = copy.deepcopy(held_lease[0])
            lease["spec"]["holderIdentity"] = None
            try:
                replace_ours(lease)
            except Exception as e:  # noqa: BLE001 - expiry releases it
                log.warning(
                    "could not release Lease %s/%s (it lapses after %s s): %s", namespace, name, lease_seconds, e
                )
    handle.raise_if_lost()  # the body finished: say it ran (in part) without the lock
