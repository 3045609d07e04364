"""The Kubernetes target (``K8sTarget``) against an in-memory stand-in for the API server's custom
objects: JSON merge patches (RFC 7386), ``resourceVersion`` preconditions answered with 409 like the
real server, Leases for the promotion lock. Canary start, a ``kubectl edit``, advance, a concurrent
edit between the target's read and its patch, and a rollback, driven through the real Promoter."""

from __future__ import annotations

import copy
import shutil
import threading
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from promotion_support import HEALTHY, drift_report, log_traffic, make_env, render, validate_isvc

from promotion.rollout import API_GROUP, API_VERSION, PLURAL, state_from_isvc

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the overlay")
NS = "motlens"
NAME = "mot-defects"


def merge(target: Any, patch: Any) -> Any:
    """RFC 7386, written here independently of promotion.rollout (what the API server does)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


class ApiServer:
    """What ``CustomObjectsApi`` reaches: objects by (group, version, namespace, plural, name), each
    change bumping ``metadata.resourceVersion``; a stale one in a patch or replace is a 409."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, ...], dict[str, Any]] = {}
        self.patches: list[dict[str, Any]] = []  # the bodies of accepted and refused patches
        self.lock = threading.Lock()
        self._rv = 0
        self._before_next_patch: Callable[[], None] | None = None

    def _bump(self, obj: dict[str, Any]) -> dict[str, Any]:
        self._rv += 1
        obj.setdefault("metadata", {})["resourceVersion"] = str(self._rv)
        return obj

    def _get(self, key: tuple[str, ...]) -> dict[str, Any]:
        if key not in self.objects:
            raise ApiException(status=404, reason="Not Found")
        return self.objects[key]

    def _check(self, key: tuple[str, ...], body: dict[str, Any], required: bool) -> None:
        sent = (body.get("metadata") or {}).get("resourceVersion")
        if (sent is not None or required) and sent != self._get(key)["metadata"]["resourceVersion"]:
            raise ApiException(status=409, reason="Conflict")

    def _store(self, key: tuple[str, ...], obj: dict[str, Any]) -> dict[str, Any]:
        if key[3] == PLURAL:
            validate_isvc(obj)  # the CRD's schema with strict field validation, as the API server applies it
        self.objects[key] = self._bump(obj)
        return copy.deepcopy(obj)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **_):
        with self.lock:
            return copy.deepcopy(self._get((group, version, namespace, plural, name)))

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **_):
        with self.lock:
            key = (group, version, namespace, plural, body["metadata"]["name"])
            if key in self.objects:
                raise ApiException(status=409, reason="AlreadyExists")
            obj = copy.deepcopy(body)
            obj["metadata"]["namespace"] = namespace
            return self._store(key, obj)

    def replace_namespaced_custom_object(self, group, version, namespace, plural, name, body, **_):
        with self.lock:
            key = (group, version, namespace, plural, name)
            self._check(key, body, required=True)
            return self._store(key, copy.deepcopy(body))

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **_):
        hook, self._before_next_patch = self._before_next_patch, None
        if hook is not None:
            hook()  # lands after the caller's read, before its patch
        with self.lock:
            key = (group, version, namespace, plural, name)
            self.patches.append(copy.deepcopy(body))
            self._check(key, body, required=False)
            patch = copy.deepcopy(body)
            (patch.get("metadata") or {}).pop("resourceVersion", None)
            return self._store(key, merge(self._get(key), patch))

    # -- what people and other controllers do -------------------------------------------------
    def edit(self, patch: dict[str, Any]) -> None:
        """``kubectl patch --type merge`` (no precondition) of the InferenceService."""
        self.patch_namespaced_custom_object(API_GROUP, API_VERSION, NS, PLURAL, NAME, patch)

    def before_next_patch(self, hook: Callable[[], None]) -> None:
        self._before_next_patch = hook

    def isvc(self) -> dict[str, Any]:
        return self.get_namespaced_custom_object(API_GROUP, API_VERSION, NS, PLURAL, NAME)

    def lease(self) -> dict[str, Any] | None:
        return self.objects.get(("coordination.k8s.io", "v1", NS, "leases", f"{NAME}-promotion"))


@pytest.fixture
def k8s(registry, tiny_bundle, tmp_path, monkeypatch):
    """Registry v1 (0.60), v2 (0.61) and v3 (0.62); the cpu overlay's InferenceService in the stand-in API server;
    a K8sTarget built through its real constructor (in-cluster config, CustomObjectsApi) pointed at it."""
    import kubernetes

    from promotion.targets import K8sTarget

    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.61, 0.62])
    api = ApiServer()
    api.create_namespaced_custom_object(API_GROUP, API_VERSION, NS, PLURAL, render(env.manifests / "overlays" / "cpu"))
    monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(kubernetes.client, "CustomObjectsApi", lambda: api)
    settings = env.settings(target="k8s", namespace=NS, golden_check=False)
    return env, api, settings, K8sTarget(settings)


def _live(api: ApiServer):
    s = state_from_isvc(api.isvc())
    return s.canary_version, s.percent, s.storage_uri, s.production_uri


def test_k8s_target_canary_edit_advance_race_and_rollback(k8s):
    from promotion.locking import LockBusy
    from promotion.status import read_status
    from promotion.targets import K8sTarget, TargetError, TargetUnavailable
    from promotion.workflow import Promoter, PromotionError, Refused

    env, api, settings, target = k8s
    uri = {v: env.registry.resolve(v).artifact_uri for v in ("1", "2")}
    p = Promoter(settings, env.registry, target, force=True)
    p.promote("1")  # adopt: the base names a placeholder production
    p.force = False
    assert _live(api) == (None, None, uri["1"], uri["1"])

    rv = api.isvc()["metadata"]["resourceVersion"]
    p.canary_start("2", 10)
    assert _live(api) == ("2", 10, uri["2"], uri["1"])
    assert api.patches[-1]["metadata"]["resourceVersion"] == rv  # the patch was conditional on the read
    assert api.isvc()["metadata"]["annotations"]["motlens.io/canary-version"] == "2"

    api.edit({"spec": {"predictor": {"canaryTrafficPercent": 30}}})  # `kubectl edit`: respected
    assert read_status(p)["live"]["percent"] == 30 and read_status(p)["disagreements"] == []

    log_traffic("2", "canary", HEALTHY)
    log_traffic("1", "production", HEALTHY)
    drift_report("2", detected=False)
    out = p.advance()
    assert out.action == "advance" and all(r.passed for r in out.gates), out.gates
    assert _live(api) == ("2", 50, uri["2"], uri["1"])  # the next step above the edited 30 %

    # someone edits the object between the target's read and its patch: the API server refuses the
    # stale patch (409) and nothing the promotion computed is written over the edit
    api.before_next_patch(lambda: api.edit({"metadata": {"labels": {"edited-by": "kubectl"}}}))
    before = len(api.patches)
    with pytest.raises(PromotionError, match="nothing was changed: cannot patch k8s inferenceservice "
                                             f"{NS}/{NAME}: 409 Conflict"):  # fmt: skip
        p.canary_set(75)
    assert len(api.patches) == before + 2  # the edit, then the refused conditional patch
    assert _live(api) == ("2", 50, uri["2"], uri["1"]) and api.isvc()["metadata"]["labels"]["edited-by"] == "kubectl"
    with pytest.raises(TargetError, match="409 Conflict"):  # the target itself, on a stale read
        api.before_next_patch(lambda: api.edit({"metadata": {"labels": {"edited-by": "again"}}}))
        target.apply(target.read().with_percent(80))
    p.canary_set(75)  # read afresh: applies
    assert _live(api) == ("2", 75, uri["2"], uri["1"])

    # an edited storage URI is not respected: refused until --force
    containers = api.isvc()["spec"]["predictor"]["containers"]
    containers[0]["env"][0]["value"] = "s3://elsewhere"
    api.edit({"spec": {"predictor": {"containers": containers}}})
    with pytest.raises(Refused, match="s3://elsewhere"):
        p.canary_set(90)
    p.force = True
    api.edit(_revisions("00002", "00002"))  # the canary's revision, as KServe reports it
    p.rollback(reason="k8s api test")
    assert _live(api) == (None, 0, uri["1"], uri["1"])
    assert env.registry.aliases() == {"production": "1"}
    # 0 % kept: without the field KServe routes everything to the latest ready revision, the canary's,
    # until the restored one is ready; `auto` removes it once KServe reports that revision ready
    assert api.isvc()["spec"]["predictor"]["canaryTrafficPercent"] == 0
    p.force = False
    env.registry.set_alias("candidate", "3")
    for created, ready in (("00002", "00002"), ("00003", "00002")):  # a status from before; then loading
        api.edit(_revisions(created, ready))
        held = p.auto()  # no canary of 3: its share would go to the latest ready revision, the rolled-back one
        assert held.action == "hold" and "restored revision is not ready yet" in held.message, held.message
        with pytest.raises(TargetUnavailable, match="restored revision is not ready yet"):
            p.canary_start("3", 10)
        assert api.isvc()["spec"]["predictor"]["canaryTrafficPercent"] == 0
    api.edit(_revisions("00003", "00003"))
    assert p.auto().action == "settle"
    env.registry.delete_alias("candidate")
    assert "canaryTrafficPercent" not in api.isvc()["spec"]["predictor"]
    assert _live(api) == (None, None, uri["1"], uri["1"])
    settle = _successful_rows(p, "settle")
    assert len(settle) == 1 and settle[0]["from_version"] == settle[0]["to_version"] == "1"

    # every run took the Lease through the same API and released it; a second holder is refused
    assert api.lease() is not None and api.lease()["spec"]["holderIdentity"] is None
    with target.lock(blocking=False):
        assert api.lease()["spec"]["holderIdentity"]
        with pytest.raises(LockBusy):
            with K8sTarget(settings).lock(blocking=False):
                pass
    assert api.lease()["spec"]["holderIdentity"] is None


def _revisions(created: str, ready: str) -> dict[str, Any]:
    """A status patch: KServe's latest created and latest ready predictor revisions."""
    names = {"latestCreatedRevision": created, "latestReadyRevision": ready}
    return {"status": {"components": {"predictor": {k: f"{NAME}-predictor-{v}" for k, v in names.items()}}}}


def _successful_rows(p, action: str) -> list[dict[str, Any]]:
    rows = p.reader().promotion_events(limit=100).to_dict("records")
    return [r for r in rows if r["action"] == action and r["success"] and not r["dry_run"]]


def test_a_rollback_finished_by_a_rerun_keeps_the_canary_revision_it_saw(k8s, monkeypatch):
    """The re-run that finished a part-done rollback wrote no ``canary_revision`` (the canary was gone
    by then), so readiness fell back to revision names alone."""
    import json

    from promotion.workflow import PartlyDone, Promoter

    env, api, settings, target = k8s
    p = Promoter(settings, env.registry, target, force=True)
    p.promote("1")
    p.force = False
    p.canary_start("2", 10)
    api.edit(_revisions("00002", "00002"))
    real = env.registry.delete_alias
    monkeypatch.setattr(env.registry, "delete_alias", lambda *a: (_ for _ in ()).throw(RuntimeError("registry down")))
    with pytest.raises(PartlyDone):
        p.rollback(reason="part-way")
    monkeypatch.setattr(env.registry, "delete_alias", real)
    api.edit(_revisions("00003", "00002"))  # the restored revision, loading
    p.rollback(reason="part-way")  # finishes it
    done = p.reader().last_change(target.name, "mot-defects")
    details = json.loads(done["details"])
    assert done["success"] and "resumes" in details and details["canary_revision"] == f"{NAME}-predictor-00002"
    api.edit(_revisions("00002", "00002"))  # a status from before the restored revision: not ready
    assert p.auto().action == "hold"


def test_k8s_target_errors_are_named(k8s):
    from promotion.targets import K8sTarget, TargetError

    _, api, settings, target = k8s
    missing = K8sTarget(settings.model_copy(update={"isvc_name": "nope"}))
    with pytest.raises(TargetError, match=f"cannot read k8s inferenceservice {NS}/nope: not found"):
        missing.read()

    def forbidden(*_a, **_k):
        raise ApiException(status=403, reason="Forbidden")

    api.patch_namespaced_custom_object = forbidden
    with pytest.raises(TargetError, match="cannot patch .*: not allowed \\(403 Forbidden\\)"):
        target.apply(target.read().deployed("9", "s3://x"))


def test_k8s_target_changes_nothing_after_losing_its_lease(k8s, caplog):
    """Another run takes the Lease over while this one holds it (its renewals failed for longer than
    the lease): this run's next renewal sees it, its next step is refused before any patch, and
    leaving the lock raises LockLost (the CLI exits non-zero) without releasing the other's Lease."""
    import time

    from promotion.locking import LockLost
    from promotion.targets import K8sTarget
    from promotion.workflow import Promoter, PromotionError

    env, api, settings, _ = k8s
    settings = settings.model_copy(update={"lease_seconds": 10})  # the least allowed: renewed every 10/3 s
    target = K8sTarget(settings)
    p = Promoter(settings, env.registry, target, force=True)
    p.promote("1")
    p.force = False
    p.canary_start("2", 10)
    lease_key = ("coordination.k8s.io", "v1", NS, "leases", f"{NAME}-promotion")
    patches = len(api.patches)
    with pytest.raises(LockLost, match=f"lost the Lease {NS}/{NAME}-promotion to promote-B:2"):
        with p.locked():
            taken = copy.deepcopy(api.objects[lease_key])
            taken["spec"]["holderIdentity"] = "promote-B:2"
            api.replace_namespaced_custom_object(*lease_key, taken)
            deadline = time.monotonic() + 30  # the renewal every lease_seconds / 3 (10 / 3 s) sees it
            while not target._lease.lost and time.monotonic() < deadline:
                time.sleep(0.1)
            with pytest.raises(PromotionError, match="nothing was changed: lost the Lease"):
                p.canary_set(50)
    assert len(api.patches) == patches and _live(api)[:2] == ("2", 10)
    assert api.objects[lease_key]["spec"]["holderIdentity"] == "promote-B:2"
    assert any(r.levelname == "ERROR" and "lost the Lease" in r.getMessage() for r in caplog.records)


def test_k8s_lease_lost_after_the_patch_leaves_the_registry_alone(k8s):
    """The Lease is taken over between this run's last patch and its alias change: the alias is not
    moved (another run now owns both), and the run ends as done part-way, not as a success."""
    from promotion.targets import K8sTarget
    from promotion.workflow import PartlyDone, Promoter

    env, api, settings, _ = k8s
    target = K8sTarget(settings)
    p = Promoter(settings, env.registry, target, force=True)
    p.promote("1")
    p.force = False
    lease_key = ("coordination.k8s.io", "v1", NS, "leases", f"{NAME}-promotion")
    patch = api.patch_namespaced_custom_object

    def patch_then_lose_lease(group, version, namespace, plural, name, body, **kw):
        out = patch(group, version, namespace, plural, name, body, **kw)
        if plural == PLURAL:  # what the renewal thread finds next: another run holds the Lease
            taken = copy.deepcopy(api.objects[lease_key])
            taken["spec"]["holderIdentity"] = "promote-B:2"
            api.replace_namespaced_custom_object(*lease_key, taken)
            target._lease.lost_to = "promote-B:2"
        return out

    api.patch_namespaced_custom_object = patch_then_lose_lease
    with pytest.raises(PartlyDone, match="lost the Lease"):
        p.canary_start("2", 10)
    assert _live(api)[:2] == ("2", 10)  # the patch landed before the loss
    assert env.registry.aliases() == {"production": "1"}  # no canary alias written without the Lease
    assert api.objects[lease_key]["spec"]["holderIdentity"] == "promote-B:2"


def test_k8s_rollback_after_a_promotion_restores_the_previous_spec(k8s):
    """No canary: `rollback` puts the version the promotion replaced back in the spec (its URI in
    STORAGE_URI and the production annotations, no canaryTrafficPercent), as a merge patch the CRD
    schema accepts; the alias follows and the version left is rejected."""
    from promotion.status import read_status
    from promotion.workflow import Promoter

    env, api, settings, target = k8s
    uri = {v: env.registry.resolve(v).artifact_uri for v in ("1", "2")}
    p = Promoter(settings, env.registry, target, force=True)
    p.promote("1")
    p.canary_start("2", 10)
    p.promote()  # forced past the live gates: no traffic here
    p.force = False
    assert _live(api) == (None, None, uri["2"], uri["2"])
    out = p.rollback(reason="k8s: p99 after promotion")
    assert out.action == "rollback"
    assert _live(api) == (None, None, uri["1"], uri["1"])
    isvc = api.isvc()
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"]["motlens.io/production-version"] == "1"
    assert "motlens.io/canary-version" not in isvc["metadata"]["annotations"]
    assert env.registry.aliases() == {"production": "1"}
    assert env.registry.resolve("2").tags["promotion.status"] == "rejected"
    assert read_status(p)["disagreements"] == []
