"""Least privilege: RBAC, service accounts, pod security and network policy of the built overlays."""

from __future__ import annotations

from typing import Any

import pytest
from manifest_helpers import MANIFESTS, OVERLAYS, kustomize, objects, one, pod_specs

WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "*"}


@pytest.fixture(scope="module", params=OVERLAYS)
def docs(request) -> list[dict[str, Any]]:
    return kustomize(MANIFESTS / "overlays" / request.param)


def test_no_cluster_wide_rbac(docs) -> None:
    assert objects(docs, "ClusterRole") == [] and objects(docs, "ClusterRoleBinding") == []


def test_promotion_role_is_limited_to_its_inferenceservice_and_lease(docs) -> None:
    (role,) = objects(docs, "Role")
    assert role["metadata"]["name"] == "motlens-promotion"
    granted: dict[tuple[str, str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                names = rule.get("resourceNames") or ["*"]
                for name in names:
                    granted.setdefault((group, resource, name), set()).update(rule["verbs"])
    assert granted == {
        ("serving.kserve.io", "inferenceservices", "mot-defects"): {"get", "patch"},
        ("coordination.k8s.io", "leases", "mot-defects-promotion"): {"get", "update"},
        # create cannot be restricted by resourceNames; the lease is made on first use
        ("coordination.k8s.io", "leases", "*"): {"create"},
    }
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
        assert not ({"list", "watch"} & set(rule["verbs"])), "list/watch would expose every object"


def test_only_the_promotion_account_is_bound(docs) -> None:
    (binding,) = objects(docs, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "motlens-promotion"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "motlens-promotion", "namespace": "motlens"}]


def test_service_accounts_and_tokens(docs) -> None:
    accounts = {sa["metadata"]["name"]: sa for sa in objects(docs, "ServiceAccount")}
    assert set(accounts) == {"motlens-predictor", "motlens-drift", "motlens-promotion"}
    assert accounts["motlens-drift"]["automountServiceAccountToken"] is False
    assert accounts["motlens-predictor"]["automountServiceAccountToken"] is False
    assert accounts["motlens-predictor"]["secrets"] == [{"name": "motlens-s3"}]  # S3 for the storage initializer
    for name in ("motlens-drift", "motlens-drift-canary"):
        drift_pod = one(docs, "CronJob", name)["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert drift_pod["serviceAccountName"] == "motlens-drift"
        assert drift_pod["automountServiceAccountToken"] is False
    promo_pod = one(docs, "CronJob", "motlens-promotion")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert promo_pod["serviceAccountName"] == "motlens-promotion"


def _effective(pod: dict[str, Any], container: dict[str, Any], key: str) -> Any:
    own = container.get("securityContext", {})
    return own[key] if key in own else pod.get("securityContext", {}).get(key)


def test_every_container_is_locked_down(docs) -> None:
    specs = pod_specs(docs)
    assert len(specs) == 4  # predictor, drift, canary drift, promotion
    for owner, pod in specs:
        check_locked_down(owner, pod)


def check_locked_down(owner: str, pod: dict[str, Any]) -> None:
    """Non-root, no privilege, read-only root filesystem, writable paths on emptyDir volumes."""
    for container in pod["containers"]:
        where = f"{owner}/{container['name']}"
        assert _effective(pod, container, "runAsNonRoot") is True, where
        assert (_effective(pod, container, "runAsUser") or 0) > 0, where
        assert _effective(pod, container, "seccompProfile") == {"type": "RuntimeDefault"}, where
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert not sc.get("privileged"), where
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in ("/tmp", "/var/lib/motlens"):  # HOME, caches and MOTLENS_HOME (see Dockerfile)
            assert "emptyDir" in volumes[mounts[path]], f"{where}: {path} is not a writable emptyDir"


def test_network_policies(docs) -> None:
    policies = {p["metadata"]["name"]: p["spec"] for p in objects(docs, "NetworkPolicy")}
    deny = policies["default-deny"]
    assert deny["podSelector"] == {} and set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    predictor = policies["mot-defects-predictor"]
    assert predictor["podSelector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "mot-defects"}
    sources = {
        peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
        for rule in predictor["ingress"] for peer in rule["from"]
    }
    assert {"knative-serving", "monitoring"} <= sources  # the Knative data plane and Prometheus
    # least privilege: no pod of the namespace reaches the predictor directly (the jobs never call it)
    assert all("podSelector" not in peer for rule in predictor["ingress"] for peer in rule["from"])
    jobs = policies["motlens-jobs"]
    assert "ingress" not in jobs and set(jobs["policyTypes"]) == {"Ingress", "Egress"}
    ports = {p["port"] for rule in jobs["egress"] for p in rule["ports"]}
    # DNS; S3/HTTPS ClickHouse/Kubernetes API; API endpoint; ClickHouse; MinIO; MLflow; Pushgateway.
    # Not Prometheus (9090) or the predictor (8080): nothing in drift/ or promotion/ calls them.
    assert ports == {53, 443, 6443, 8123, 8443, 9000, 5000, 9091}
    labels = {one(docs, "CronJob", n)["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
              ["app.kubernetes.io/component"] for n in ("motlens-drift", "motlens-drift-canary", "motlens-promotion")}
    (expr,) = jobs["podSelector"]["matchExpressions"]
    assert expr["key"] == "app.kubernetes.io/component" and set(expr["values"]) == labels
