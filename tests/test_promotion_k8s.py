"""Kubernetes-API target against a real cluster (with the KServe CRD installed). Skips with the reason
when no kubeconfig / cluster is reachable. Uses a throw-away namespace and deletes it afterwards."""

from __future__ import annotations

import shutil
import uuid

import pytest
from promotion_support import make_env, render

pytestmark = pytest.mark.integration


def _cluster_or_skip():
    try:
        from kubernetes import client, config
    except ImportError:
        pytest.skip("the kubernetes client is not installed")
    try:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
        client.VersionApi().get_code(_request_timeout=5)
    except Exception as e:  # noqa: BLE001 - any failure means: no usable cluster here
        pytest.skip(f"no reachable Kubernetes cluster ({type(e).__name__}: {e})")
    try:
        client.ApiextensionsV1Api().read_custom_resource_definition("inferenceservices.serving.kserve.io")
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"the cluster has no KServe InferenceService CRD ({e})")
    return client


@pytest.fixture
def cluster_ns():
    client = _cluster_or_skip()
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is needed to render the overlay")
    name = f"motlens-promote-{uuid.uuid4().hex[:8]}"
    client.CoreV1Api().create_namespace({"metadata": {"name": name}})
    yield client, name
    client.CoreV1Api().delete_namespace(name)


def test_k8s_target_canary_edit_and_rollback(cluster_ns, registry, tiny_bundle, tmp_path, monkeypatch):
    from promotion.locking import LockBusy
    from promotion.rollout import API_GROUP, API_VERSION, PLURAL, state_from_isvc
    from promotion.status import read_status
    from promotion.targets import K8sTarget
    from promotion.workflow import Promoter, Refused

    client, ns = cluster_ns
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.6, 0.61])
    isvc = render(env.manifests / "overlays" / "cpu")
    isvc["metadata"]["namespace"] = ns
    api = client.CustomObjectsApi()
    api.create_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, isvc)

    settings = env.settings(target="k8s", namespace=ns, golden_check=False)
    target = K8sTarget(settings)
    p = Promoter(settings, registry, target, force=True)
    p.promote("1")
    p.force = False
    p.canary_start("2", 10)
    live = state_from_isvc(target.get())
    assert (live.canary_version, live.percent, live.storage_uri) == ("2", 10, registry.resolve("2").artifact_uri)

    # `kubectl edit` of the percentage is respected
    api.patch_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, "mot-defects",
                                       {"spec": {"predictor": {"canaryTrafficPercent": 30}}})
    assert read_status(p)["live"]["percent"] == 30 and read_status(p)["disagreements"] == []
    # an edited storage URI is not: refused until --force
    p.canary_set(40)
    body = target.get()
    body["spec"]["predictor"]["containers"][0]["env"][0]["value"] = "s3://elsewhere"
    api.patch_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL, "mot-defects",
                                       {"spec": {"predictor": {"containers": body["spec"]["predictor"]["containers"]}}})
    with pytest.raises(Refused, match="s3://elsewhere"):
        p.canary_set(50)
    p.force = True
    p.rollback(reason="integration test")
    live = state_from_isvc(target.get())
    assert (live.canary_active, live.percent, live.storage_uri) == (False, None, registry.resolve("1").artifact_uri)

    # the Lease: a second holder is refused while the first holds it
    with target.lock(blocking=False):
        with pytest.raises(LockBusy):
            with K8sTarget(settings).lock(blocking=False):
                pass
    with target.lock(blocking=False):
        pass
