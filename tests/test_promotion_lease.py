"""The Kubernetes Lease lock against an in-memory stand-in for the API server's Lease objects
(create/get/replace with resourceVersion preconditions, 404/409 like the real server)."""

from __future__ import annotations

import copy
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from kubernetes.client.exceptions import ApiException

from promotion.locking import LockBusy, LockLost, _fmt, lease_lock


class LeaseStore:
    """What the API server does with a Lease: stores it and refuses stale resourceVersions (409)."""

    def __init__(self):
        self.obj = None
        self.lock = threading.Lock()

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        with self.lock:
            if self.obj is None:
                raise ApiException(status=404)
            return copy.deepcopy(self.obj)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        with self.lock:
            if self.obj is not None:
                raise ApiException(status=409)
            self.obj = {**copy.deepcopy(body), "metadata": {**body["metadata"], "resourceVersion": "1"}}
            return copy.deepcopy(self.obj)

    def replace_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        with self.lock:
            if body["metadata"].get("resourceVersion") != self.obj["metadata"]["resourceVersion"]:
                raise ApiException(status=409)
            rv = str(int(self.obj["metadata"]["resourceVersion"]) + 1)
            self.obj = {**copy.deepcopy(body), "metadata": {**body["metadata"], "resourceVersion": rv}}
            return copy.deepcopy(self.obj)


def test_lease_is_renewed_while_held_and_released_after():
    api = LeaseStore()
    with lease_lock(api, "ns", "motlens-promotion", lease_seconds=3, blocking=False):
        first = api.obj["spec"]["renewTime"]
        deadline = time.monotonic() + 30
        while api.obj["spec"]["renewTime"] == first and time.monotonic() < deadline:
            time.sleep(0.1)
        assert api.obj["spec"]["renewTime"] > first  # renewed, so a long run keeps the lock
        with pytest.raises(LockBusy):
            with lease_lock(api, "ns", "motlens-promotion", lease_seconds=3, blocking=False):
                pass
    assert api.obj["spec"]["holderIdentity"] is None  # the release used the renewed resourceVersion
    with lease_lock(api, "ns", "motlens-promotion", lease_seconds=3, blocking=False):
        assert api.obj["spec"]["holderIdentity"]


def _held_by_other(api, renewed, lease_seconds):
    """A Lease another host holds, last renewed at ``renewed`` by that host's clock."""
    api.obj = {
        "metadata": {"name": "motlens-promotion", "resourceVersion": "7"},
        "spec": {"holderIdentity": "promote-A:1", "leaseDurationSeconds": lease_seconds,
                 "acquireTime": _fmt(renewed), "renewTime": _fmt(renewed)},
    }


def _renewing(api, clock_offset, stop):
    """Host A renewing its Lease every 0.3 s with its own clock (``clock_offset`` from ours)."""
    while not stop.wait(0.3):
        with api.lock:
            rv = str(int(api.obj["metadata"]["resourceVersion"]) + 1)
            api.obj["spec"]["renewTime"] = _fmt(datetime.now(UTC) + clock_offset)
            api.obj["metadata"]["resourceVersion"] = rv


def test_a_slow_holder_clock_does_not_hand_its_lease_to_a_non_blocking_run():
    """A renewed its Lease a moment ago, but its clock runs 10 min behind: by this host's clock the
    renewal looks 600 s old, twice the lease. A non-blocking run (`auto`) must not take it."""
    api = LeaseStore()
    _held_by_other(api, datetime.now(UTC) - timedelta(minutes=10), 300)
    with pytest.raises(LockBusy, match="clock"):
        with lease_lock(api, "ns", "motlens-promotion", lease_seconds=300, blocking=False):
            pass
    assert api.obj["spec"]["holderIdentity"] == "promote-A:1"


def test_a_lease_past_its_duration_and_the_skew_allowance_is_taken_over():
    """A holder that stopped renewing (a killed pod) long enough ago, by any tolerated clock."""
    api = LeaseStore()
    _held_by_other(api, datetime.now(UTC) - timedelta(seconds=300 + 600 + 5), 300)
    with lease_lock(api, "ns", "motlens-promotion", lease_seconds=300, blocking=False, clock_skew_s=600):
        assert api.obj["spec"]["holderIdentity"] != "promote-A:1"
        assert api.obj["spec"]["leaseTransitions"] == 1


def test_blocking_takes_over_a_stalled_lease_timed_by_its_own_clock():
    """The holder's clock ran 1 h ahead when it last renewed, then it died: by renewTime the lease
    looks valid for an hour. A blocking run watches the record stay unchanged for the lease duration
    (this host's monotonic clock) and takes it over."""
    api = LeaseStore()
    _held_by_other(api, datetime.now(UTC) + timedelta(hours=1), 2)
    t0 = time.monotonic()
    with lease_lock(api, "ns", "motlens-promotion", lease_seconds=2, blocking=True, timeout_s=0.5):
        waited = time.monotonic() - t0
        assert api.obj["spec"]["holderIdentity"] != "promote-A:1"
    assert 2.0 <= waited < 10.0


def test_blocking_never_takes_a_lease_its_holder_keeps_renewing():
    """A renews every 0.3 s with a clock 60 s behind ours (renewals look 30× the 2 s lease old): a
    blocking run sees the record change and gives up at its timeout instead of taking it."""
    api = LeaseStore()
    _held_by_other(api, datetime.now(UTC) - timedelta(seconds=60), 2)
    stop = threading.Event()
    renewer = threading.Thread(target=_renewing, args=(api, timedelta(seconds=-60), stop), daemon=True)
    renewer.start()
    try:
        with pytest.raises(LockBusy):
            with lease_lock(api, "ns", "motlens-promotion", lease_seconds=2, blocking=True, timeout_s=4):
                pass
    finally:
        stop.set()
        renewer.join()
    assert api.obj["spec"]["holderIdentity"] == "promote-A:1"


class RacingStore(LeaseStore):
    """Two first-ever runs: this run's GET finds no Lease (404), but another host's create lands
    before this run's own (409)."""

    def __init__(self, other_lease_seconds):
        super().__init__()
        self.other_lease_seconds = other_lease_seconds
        self.raced = False

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if not self.raced:
            self.raced = True
            now = _fmt(datetime.now(UTC))
            with self.lock:
                self.obj = {
                    "metadata": {"name": body["metadata"]["name"], "resourceVersion": "1"},
                    "spec": {"holderIdentity": "promote-A:1", "leaseDurationSeconds": self.other_lease_seconds,
                             "acquireTime": now, "renewTime": now},
                }
        return super().create_namespaced_custom_object(group, version, namespace, plural, body)


def test_a_lost_create_race_is_a_busy_lock_not_a_crash():
    """`auto` holds (LockBusy), it does not crash on the 409 of a create another run won."""
    api = RacingStore(300)
    with pytest.raises(LockBusy, match="held by promote-A:1"):
        with lease_lock(api, "ns", "motlens-promotion", lease_seconds=300, blocking=False):
            pass
    assert api.obj["spec"]["holderIdentity"] == "promote-A:1"


def test_a_lost_create_race_makes_a_blocking_run_wait_for_the_winner():
    """A manual command waits: the winner (dead here, never renewing its 1 s Lease) is watched and
    taken over, as any held Lease."""
    api = RacingStore(1)
    with lease_lock(api, "ns", "motlens-promotion", lease_seconds=1, blocking=True, timeout_s=0.5):
        assert api.obj["spec"]["holderIdentity"] not in (None, "promote-A:1")
    assert api.obj["spec"]["holderIdentity"] is None


class LostReplyStore(LeaseStore):
    """The first renewal is applied by the server, but its reply is lost (a gateway timeout)."""

    def __init__(self):
        super().__init__()
        self.replaces = 0

    def replace_namespaced_custom_object(self, *args):
        out = super().replace_namespaced_custom_object(*args)
        self.replaces += 1
        if self.replaces == 1:
            raise ApiException(status=504, reason="Gateway Timeout")
        return out


def _wait_for(cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.05)
    return cond()


def test_a_renewal_whose_reply_was_lost_does_not_cost_the_lease():
    """After a renewal the server applied but whose reply never came, the holder's resourceVersion is
    stale: the next renewal's 409 makes it re-read the Lease, see itself still holding it and renew
    with the fresh resourceVersion, so the record keeps changing and nobody takes it over."""
    api = LostReplyStore()
    with lease_lock(api, "ns", "motlens-promotion", lease_seconds=3, blocking=False) as held:
        me = api.obj["spec"]["holderIdentity"]
        # the lost-reply renewal (1 s), a 409 + re-read + renewal (2 s), a plain renewal (3 s)
        assert _wait_for(lambda: api.replaces >= 3)
        assert not held.lost
        assert api.obj["spec"]["holderIdentity"] == me
    assert api.obj["spec"]["holderIdentity"] is None  # released with the fresh resourceVersion


def test_a_holder_that_lost_its_lease_stops_and_says_so(caplog):
    """Another run took the Lease over (this holder's renewals failed for longer than the lease): the
    holder's next renewal finds it held by another; it flags the loss, `check()` refuses further
    changes, leaves the other's Lease alone at exit and raises LockLost."""
    from promotion.locking import LockLost

    api = LeaseStore()
    with pytest.raises(LockLost, match="lost the Lease"):
        with lease_lock(api, "ns", "motlens-promotion", lease_seconds=3, blocking=False) as held:
            with api.lock:  # the takeover, as another run's replace
                api.obj["spec"]["holderIdentity"] = "promote-B:2"
                api.obj["metadata"]["resourceVersion"] = str(int(api.obj["metadata"]["resourceVersion"]) + 1)
            assert _wait_for(lambda: held.lost)
            with pytest.raises(LockLost):
                held.check()
    assert api.obj["spec"]["holderIdentity"] == "promote-B:2"  # not released: it is not ours
    assert any(r.levelname == "ERROR" and "lost the Lease" in r.getMessage() for r in caplog.records)


def test_a_body_error_is_not_masked_by_a_lost_lease():
    """When the work itself failed, that error propagates (the loss is logged as an ERROR)."""
    api = LeaseStore()
    with pytest.raises(ValueError, match="boom"):
        with lease_lock(api, "ns", "motlens-promotion", lease_seconds=3, blocking=False) as held:
            with api.lock:
                api.obj["spec"]["holderIdentity"] = "promote-B:2"
                api.obj["metadata"]["resourceVersion"] = str(int(api.obj["metadata"]["resourceVersion"]) + 1)
            assert _wait_for(lambda: held.lost)
            raise ValueError("boom")


class FailingRenewals(LeaseStore):
    """The API server answers every write after the Lease was taken with a 500 (or times out)."""

    def __init__(self):
        super().__init__()
        self.failing = False

    def replace_namespaced_custom_object(self, *args):
        if self.failing:
            raise ApiException(status=500, reason="Internal Server Error")
        return super().replace_namespaced_custom_object(*args)


def test_a_lease_not_renewed_within_its_deadline_refuses_further_changes():
    """Only a 409 marked the Lease lost: with renewals failing otherwise, the run kept patching after
    another run could have taken the Lease over."""
    api = FailingRenewals()
    with lease_lock(api, "ns", "motlens-promotion", lease_seconds=3, blocking=False) as held:
        held.check()  # just taken
        api.failing = True
        deadline = time.monotonic() + 10
        while time.monotonic() - held.renewed_at <= held.renew_deadline_s and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(LockLost, match=r"has not been renewed for \d+ s \(renew deadline 2 s\)"):
            held.check()
    # leaving is no error: the Lease was not seen lost (it lapses, as its release failed too)


class TakeoverRace(LeaseStore):
    """Two runs take over a lapsed Lease at once: the other's replace lands first."""

    def replace_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        taking = body["spec"].get("holderIdentity") not in (None, "promote-C:3")
        if taking and self.obj["spec"]["holderIdentity"] == "A:1":
            with self.lock:
                self.obj["spec"]["holderIdentity"] = "promote-C:3"
                self.obj["metadata"]["resourceVersion"] = str(int(self.obj["metadata"]["resourceVersion"]) + 1)
        return super().replace_namespaced_custom_object(group, version, namespace, plural, name, body)


def test_a_lost_takeover_race_names_the_holder_it_read_not_this_run():
    api = TakeoverRace()
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    api.obj = {"metadata": {"name": "motlens-promotion", "resourceVersion": "7"},
               "spec": {"holderIdentity": "A:1", "leaseDurationSeconds": 3, "renewTime": _fmt(long_ago)}}  # fmt: skip
    with pytest.raises(LockBusy, match="held by A:1"), lease_lock(
        api, "ns", "motlens-promotion", lease_seconds=3, blocking=False
    ):
        pass
