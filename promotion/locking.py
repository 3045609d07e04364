"""Mutual exclusion for promotion runs, so two runs (two CronJob pods, two people) never step twice.

Local and GitOps targets: an ``fcntl.flock`` on a path (the overlay directory, or a lock file in the
state directory); the kernel drops it when the process dies, so a crashed run never wedges the next.
Kubernetes: a ``coordination.k8s.io/v1`` Lease next to the InferenceService, taken and released with
``resourceVersion`` preconditions (optimistic concurrency), renewed every ``lease_seconds / 3`` while
held and expiring ``lease_seconds`` after the last renewal, so a killed pod's lease lapses.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class LockBusy(RuntimeError):
    """Another promotion run holds the lock."""


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
    return datetime.fromisoformat(ts.replace("Z", "+00:00"))


@contextmanager
def lease_lock(
    api: Any, namespace: str, name: str, *, lease_seconds: int, blocking: bool, timeout_s: float = 60.0
) -> Iterator[None]:
    """Hold the Lease ``name`` (created on first use) through ``CustomObjectsApi`` ``api``."""
    from kubernetes.client.exceptions import ApiException

    me = holder_identity()
    group, version, plural = "coordination.k8s.io", "v1", "leases"
    deadline = time.monotonic() + timeout_s

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
        try:
            if lease is None:
                body = {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": name},
                    "spec": spec(),
                }
                lease = api.create_namespaced_custom_object(group, version, namespace, plural, body)
                break
            held = lease.get("spec") or {}
            renewed = _parse(held.get("renewTime"))
            expired = (
                renewed is None or renewed + timedelta(seconds=held.get("leaseDurationSeconds") or 0) < _now()
            )
            if not held.get("holderIdentity") or expired:
                lease["spec"] = {
                    **held,
                    **spec(),
                    "leaseTransitions": (held.get("leaseTransitions") or 0) + 1,
                }
                lease = api.replace_namespaced_custom_object(group, version, namespace, plural, name, lease)
                break
        except ApiException as e:
            if e.status != 409:  # 409: another run created or took it first
                raise
        if not blocking or time.monotonic() >= deadline:
            holder = (lease or {}).get("spec", {}).get("holderIdentity", "another run")
            raise LockBusy(f"Lease {namespace}/{name} is held by {holder}")
        time.sleep(1.0)
    held_lease = [lease]
    guard = threading.Lock()
    stop = threading.Event()

    def renew() -> None:  # keep renewTime fresh so a run longer than lease_seconds keeps the lock
        while not stop.wait(max(1.0, lease_seconds / 3)):
            with guard:
                body = held_lease[0]
                body["spec"]["renewTime"] = _fmt(_now())
                try:
                    held_lease[0] = api.replace_namespaced_custom_object(
                        group, version, namespace, plural, name, body
                    )
                except Exception as e:  # noqa: BLE001 - retried next period; expiry is the fallback
                    log.warning("could not renew Lease %s/%s: %s", namespace, name, e)

    renewer = threading.Thread(target=renew, name=f"lease-renew-{name}", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join()
        lease = held_lease[0]
        lease["spec"]["holderIdentity"] = None
        try:
            api.replace_namespaced_custom_object(group, version, namespace, plural, name, lease)
        except ApiException:
            pass  # expiry releases it
