"""The optional shared-spool component: predictor spools on a shared volume, drained by a replay CronJob."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifest_helpers import MANIFESTS, OVERLAYS, isvc_container, isvc_errors, kustomize, objects, one
from test_manifests_security import check_locked_down

from motlens.cli import build_parser
from predlog.settings import PredlogSettings

SPOOL = "/var/lib/motlens-spool"


def _with_component(tmp_path: Path, overlay: str) -> list[dict[str, Any]]:
    """An overlay as docs/deploy.md tells to change it: the component listed, its patches kept last."""
    root = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, root)
    path = root / "overlays" / overlay / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    kustomization["components"] = ["../../components/shared-spool"]
    path.write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return kustomize(path.parent)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container["env"]}


def _volume_at(pod: dict[str, Any], container: dict[str, Any], mount_path: str) -> dict[str, Any]:
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_predictors_spool_below_their_pod_names_on_the_shared_claim(tmp_path: Path, overlay: str) -> None:
    docs = _with_component(tmp_path, overlay)
    isvc = one(docs, "InferenceService", "mot-defects")
    assert isvc_errors(isvc) == []
    container = isvc_container(isvc)
    env = _env(container)
    assert [e["name"] for e in container["env"][:2]] == ["STORAGE_URI", "MOTLENS_SERVE_MODEL_SHA256"]  # contract
    settings = PredlogSettings(
        dir=env["MOTLENS_PREDLOG_DIR"]["value"], dir_per_host=env["MOTLENS_PREDLOG_DIR_PER_HOST"]["value"],
        lock_wait_s=env["MOTLENS_PREDLOG_LOCK_WAIT_S"]["value"],
    )  # fmt: skip
    assert settings.dir_per_host and settings.root.parent == Path(SPOOL)
    # a restarted container waits out the replay job's hold on its directory (the job's --timeout)
    job = one(docs, "CronJob", "motlens-predlog-replay")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    timeout = build_parser().parse_args(job["containers"][0]["args"]).timeout
    assert settings.lock_wait_s > timeout
    claim = _volume_at(isvc["spec"]["predictor"], container, SPOOL)["persistentVolumeClaim"]["claimName"]
    pvc = one(docs, "PersistentVolumeClaim", claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes and the job at once
    for kind, name in (
        ("PersistentVolumeClaim", claim),
        ("CronJob", "motlens-predlog-replay"),
        ("ServiceAccount", "motlens-predlog-replay"),
        ("NetworkPolicy", "motlens-predlog-replay"),
    ):
        meta = one(docs, kind, name)["metadata"]  # as the base's objects
        assert meta["namespace"] == "motlens" and meta["labels"]["app.kubernetes.io/part-of"] == "motlens", meta
    # the emptyDir state (HOME, caches) is still there, and the rollout patch still applied last
    assert _volume_at(isvc["spec"]["predictor"], container, "/var/lib/motlens") == {
        "name": "state", "emptyDir": {"sizeLimit": "5Gi"}
    }  # fmt: skip
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 100


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_replay_job_drains_that_claim_as_the_predictors_would(tmp_path: Path, overlay: str) -> None:
    docs = _with_component(tmp_path, overlay)
    job = one(docs, "CronJob", "motlens-predlog-replay")
    pod = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("ghcr.io/") and "motlens-jobs" in container["image"]
    args = build_parser().parse_args(container["args"])  # a real `motlens` invocation
    assert (args.command, args.log_command, args.under, args.remove_empty) == ("log", "replay", [Path(SPOOL)], True)
    assert args.timeout * 2 < job["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    assert job["spec"]["concurrencyPolicy"] == "Forbid"
    isvc = one(docs, "InferenceService", "mot-defects")
    claim = _volume_at(isvc["spec"]["predictor"], isvc_container(isvc), SPOOL)["persistentVolumeClaim"]
    assert _volume_at(pod, container, SPOOL)["persistentVolumeClaim"] == claim
    # it stores what the predictors would have: their ClickHouse user, no DDL
    env = _env(container)
    predictor_env = _env(isvc_container(isvc))
    for name in ("MOTLENS_CLICKHOUSE_URL", "MOTLENS_CLICKHOUSE_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "motlens-clickhouse"
        assert env[name]["valueFrom"]["secretKeyRef"]["key"] == predictor_env[name]["valueFrom"]["secretKeyRef"]["key"]
    assert PredlogSettings(auto_migrate=env["MOTLENS_PREDLOG_AUTO_MIGRATE"]["value"]).auto_migrate is False
    # least privilege: its own account without a token or a binding, DNS and ClickHouse only
    assert pod["serviceAccountName"] == "motlens-predlog-replay" and pod["automountServiceAccountToken"] is False
    account = one(docs, "ServiceAccount", "motlens-predlog-replay")
    assert account["automountServiceAccountToken"] is False
    assert all(s["name"] != "motlens-predlog-replay" for b in objects(docs, "RoleBinding") for s in b["subjects"])
    policy = one(docs, "NetworkPolicy", "motlens-predlog-replay")["spec"]
    labels = job["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert "ingress" not in policy and set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert {p["port"] for rule in policy["egress"] for p in rule["ports"]} == {53, 443, 8123, 8443}


def test_the_replay_job_is_locked_down_as_the_others(tmp_path: Path) -> None:
    docs = _with_component(tmp_path, "cpu")
    pod = one(docs, "CronJob", "motlens-predlog-replay")["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    check_locked_down("CronJob/motlens-predlog-replay", pod)
    check_locked_down("InferenceService/mot-defects", one(docs, "InferenceService", "mot-defects")["spec"]["predictor"])
