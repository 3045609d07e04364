"""The Kubernetes Lease lock against an in-memory stand-in for the API server's Lease objects
(create/get/replace with resourceVersion preconditions, 404/409 like the real server)."""

from __future__ import annotations

import copy
import threading
import time

import pytest
from kubernetes.client.exceptions import ApiException

from promotion.locking import LockBusy, lease_lock


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
