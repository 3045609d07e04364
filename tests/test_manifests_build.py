"""The kustomizations build, the InferenceService follows KServe's CRD and the rollout contract."""

from __future__ import annotations

import copy
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifest_helpers import (
    MANIFESTS,
    OVERLAYS,
    find_tool,
    isvc_container,
    isvc_errors,
    kustomize,
    objects,
    one,
    pod_specs,
)

from drift.settings import DriftSettings
from promotion import rollout
from promotion.rollout import RolloutState, json6902_ops

KNATIVE_MODES = {"Serverless", "Knative"}  # the legacy and the current spelling of Knative mode


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(MANIFESTS / "overlays" / name) for name in OVERLAYS}


def _isvc(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "InferenceService", "mot-defects")


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container["env"]}


@pytest.mark.parametrize("path", ["base", "overlays/cpu", "overlays/gpu", "monitoring"])
def test_kustomization_builds(path: str) -> None:
    docs = kustomize(MANIFESTS / path)
    assert docs and all(d.get("apiVersion") and d.get("kind") and d["metadata"].get("name") for d in docs)
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {"motlens"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inferenceservice_matches_kserve_crd(built, overlay: str) -> None:
    isvcs = objects(built[overlay], "InferenceService")
    assert [i["metadata"]["name"] for i in isvcs] == ["mot-defects"]
    assert isvcs[0]["apiVersion"] == "serving.kserve.io/v1beta1"
    assert isvc_errors(isvcs[0]) == []


def test_crd_validation_catches_mistakes(built) -> None:
    """The validator is strict: a misspelt field and a wrongly typed value are both reported."""
    isvc = copy.deepcopy(_isvc(built["cpu"]))
    isvc["spec"]["predictor"]["canaryTrafficPercnt"] = 10
    isvc["spec"]["predictor"]["minReplicas"] = "one"
    isvc_container(isvc)["resources"]["limits"]["cpu"] = {"cores": 4}
    errors = "\n".join(isvc_errors(isvc))
    assert "canaryTrafficPercnt" in errors
    assert "spec/predictor/minReplicas" in errors
    assert "containers/0/resources/limits/cpu" in errors


def test_base_sets_canary_traffic_percent() -> None:
    """100 = no rollout in progress; the promotion CLI moves it (N%, then 100 or removed)."""
    assert _isvc(kustomize(MANIFESTS / "base"))["spec"]["predictor"]["canaryTrafficPercent"] == 100


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_knative_mode_canary_and_autoscaling(built, overlay: str) -> None:
    isvc = _isvc(built[overlay])
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in KNATIVE_MODES
    predictor = isvc["spec"]["predictor"]
    percent = predictor.get("canaryTrafficPercent")
    if isvc["metadata"]["annotations"].get("motlens.io/canary-version"):  # a rollout committed by the CLI
        assert isinstance(percent, int) and 0 <= percent <= 100
    else:
        assert percent in (None, 100)
    assert predictor["minReplicas"] >= 1 and predictor["maxReplicas"] >= predictor["minReplicas"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] > 0


@pytest.mark.parametrize("path", ["base", "overlays/cpu", "overlays/gpu"])
def test_storage_uri_contract(path: str) -> None:
    """containers[0] = kserve-container, env[0] = STORAGE_URI (the promotion CLI patches these by index)."""
    container = isvc_container(_isvc(kustomize(MANIFESTS / path)))
    assert container["name"] == "kserve-container"
    assert container["env"][0]["name"] == "STORAGE_URI"
    assert container["env"][0]["value"].startswith("s3://")
    assert container["command"] == ["motlens"] and container["args"][:3] == ["serve", "--model", "/mnt/models"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_predictor_container(built, overlay: str) -> None:
    isvc = _isvc(built[overlay])
    container = isvc_container(isvc)
    (port,) = container["ports"]  # Knative serves exactly one port
    assert port["containerPort"] == 8080 and port["name"] == "http1"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/models/mot-defects/ready"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] == port["containerPort"], probe
    startup = container["startupProbe"]
    startup_budget = startup["periodSeconds"] * startup["failureThreshold"]
    assert startup_budget >= 300  # a cold model load, warm-up and golden check
    deadline = re.fullmatch(r"(\d+)([sm])", isvc["metadata"]["annotations"]["serving.knative.dev/progress-deadline"])
    assert deadline and int(deadline.group(1)) * {"s": 1, "m": 60}[deadline.group(2)] > startup_budget
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    env = _env(container)
    assert env["MOTLENS_SERVE_ENABLE_GRPC"]["value"] == "false"
    assert env["MOTLENS_CLICKHOUSE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "motlens-clickhouse"
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
    assert annotations["prometheus.kserve.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    assert isvc["spec"]["predictor"]["serviceAccountName"] == "motlens-predictor"


def test_gpu_overlay_asks_for_one_gpu(built) -> None:
    gpu, cpu = _isvc(built["gpu"]), _isvc(built["cpu"])
    container = isvc_container(gpu)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    tolerations = gpu["spec"]["predictor"]["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" and t["effect"] == "NoSchedule" for t in tolerations)
    assert gpu["spec"]["predictor"]["nodeSelector"]
    env = _env(container)
    assert env["MOTLENS_SERVE_DEVICE"]["value"] == "cuda"
    assert env["MOTLENS_SERVE_DTYPE"]["value"] == "float16"
    assert container["image"].endswith("-cuda")
    cpu_container = isvc_container(cpu)
    assert "nvidia.com/gpu" not in yaml.safe_dump(cpu)
    assert _env(cpu_container)["MOTLENS_SERVE_DEVICE"]["value"] == "cpu"
    assert cpu_container["image"].endswith("-cpu")


#: pod-spec fields Knative passes on only when its config-features enables them (off by default)
KNATIVE_GATED = {
    "nodeSelector": "kubernetes.podspec-nodeselector",
    "tolerations": "kubernetes.podspec-tolerations",
    "affinity": "kubernetes.podspec-affinity",
    "runtimeClassName": "kubernetes.podspec-runtimeclassname",
    "priorityClassName": "kubernetes.podspec-priorityclassname",
    "schedulerName": "kubernetes.podspec-schedulername",
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_knative_gated_field_is_in_the_deploy_prerequisites(built, overlay: str) -> None:
    """The GPU overlay's nodeSelector and tolerations are refused by a stock Knative (its webhook rejects
    the revision) unless config-features enables them: docs/deploy.md must say which flags to set."""
    prerequisites = (MANIFESTS.parent / "docs" / "deploy.md").read_text().split("## 1.", 1)[0]
    used = sorted(set(_isvc(built[overlay])["spec"]["predictor"]) & set(KNATIVE_GATED))
    missing = [KNATIVE_GATED[f] for f in used if f'"{KNATIVE_GATED[f]}":"enabled"' not in prerequisites]
    assert missing == [], f"{overlay}: docs/deploy.md's prerequisites do not enable {missing}"
    if overlay == "gpu":
        assert used == ["nodeSelector", "tolerations"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_lists_rollout_patch_last(overlay: str) -> None:
    kustomization = yaml.safe_load((MANIFESTS / "overlays" / overlay / "kustomization.yaml").read_text())
    last = kustomization["patches"][-1]
    assert last["path"] == "rollout.yaml"
    assert last["target"] == {"group": "serving.kserve.io", "version": "v1beta1",
                              "kind": "InferenceService", "name": "mot-defects"}
    ops = yaml.safe_load((MANIFESTS / "overlays" / overlay / "rollout.yaml").read_text())
    assert isinstance(ops, list) and ops and all(op["op"] in {"test", "add", "replace", "remove"} for op in ops)


def _overlay_copy(tmp_path: Path) -> Path:
    root = tmp_path / "manifests"
    shutil.copytree(MANIFESTS, root)
    return root


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rollout_ops_as_the_promotion_cli_writes_them(tmp_path: Path, overlay: str) -> None:
    """A canary at 10% written the way the promotion CLI's GitOps target does: the build carries it
    and the InferenceService still matches the CRD."""
    root = _overlay_copy(tmp_path)
    canary_uri = "s3://mlflow-artifacts/1/canaryrun/artifacts/model"
    production = RolloutState(None).deployed("6", "s3://mlflow-artifacts/1/prodrun/artifacts/model", "a" * 64)
    ops = json6902_ops(production.with_canary("7", canary_uri, 10, "b" * 64))
    (root / "overlays" / overlay / "rollout.yaml").write_text(yaml.safe_dump(ops))
    isvc = _isvc(kustomize(root / "overlays" / overlay))
    assert isvc_container(isvc)["env"][0] == {"name": "STORAGE_URI", "value": canary_uri}
    assert isvc_container(isvc)["env"][1] == {"name": "MOTLENS_SERVE_MODEL_SHA256", "value": "b" * 64}
    assert isvc["metadata"]["annotations"]["motlens.io/production-bundle-sha256"] == "a" * 64
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert isvc["metadata"]["annotations"]["motlens.io/canary-version"] == "7"
    assert isvc["metadata"]["annotations"]["motlens.io/production-version"] == "6"
    assert isvc_errors(isvc) == []


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_promotion_changes_only_what_the_kserve_prerequisite_keeps_out_of_the_revision(built, overlay: str) -> None:
    """KServe copies the InferenceService's annotations into the Knative revision: a promotion (canary →
    production) patches only the motlens.io/* annotations and canaryTrafficPercent, so with those keys
    in KServe's serviceAnnotationDisallowedList (docs/deploy.md "Prerequisites", which must list every
    one) it makes no revision and the warm canary revision takes the traffic."""
    live = _isvc(built[overlay])
    production = rollout.state_from_isvc(live)
    canary = production.with_canary("7", "s3://mlflow-artifacts/1/canaryrun/artifacts/model", 10, "b" * 64)
    live = rollout.apply_merge_patch(live, rollout.merge_patch(live, canary))
    patch = rollout.merge_patch(live, rollout.state_from_isvc(live).promoted())
    keys = {rollout.ANN_PROD_VERSION, rollout.ANN_PROD_URI, rollout.ANN_PROD_SHA, rollout.ANN_CANARY_VERSION}
    assert set(patch) == {"metadata", "spec"} and set(patch["metadata"]) == {"annotations"}
    assert set(patch["metadata"]["annotations"]) <= keys
    assert patch["spec"] == {"predictor": {"canaryTrafficPercent": None}}
    deploy = (MANIFESTS.parent / "docs" / "deploy.md").read_text()
    (listed,) = re.findall(r'serviceAnnotationDisallowedList\\":\[(.*?)\]', deploy, re.S)
    assert set(re.findall(r'\\"(motlens\.io/[a-z0-9-]+)\\"', listed)) == keys


def test_rollout_guard_rejects_a_base_that_breaks_the_contract(tmp_path: Path) -> None:
    """The initial rollout.yaml asserts the contract: moving STORAGE_URI out of env[0] fails the build."""
    root = _overlay_copy(tmp_path)
    base = root / "base" / "inferenceservice.yaml"
    isvc = yaml.safe_load(base.read_text())
    env = isvc_container(isvc)["env"]
    env.append(env.pop(0))
    base.write_text(yaml.safe_dump(isvc))
    with pytest.raises(AssertionError, match=r"testing value /spec/predictor/containers/0/env/0/name failed"):
        kustomize(root / "overlays" / "cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_cronjobs(built, overlay: str) -> None:
    docs = built[overlay]
    drift = one(docs, "CronJob", "motlens-drift")
    canary = one(docs, "CronJob", "motlens-drift-canary")
    promotion = one(docs, "CronJob", "motlens-promotion")
    for job in (drift, canary, promotion):
        (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        assert container["image"].startswith("ghcr.io/") and "motlens-jobs" in container["image"]
        env = _env(container)
        clickhouse = env["MOTLENS_CLICKHOUSE_URL"]["valueFrom"]["secretKeyRef"]
        assert clickhouse == {"name": "motlens-clickhouse-jobs", "key": "url"}
        assert env["MLFLOW_TRACKING_URI"]["valueFrom"]["configMapKeyRef"]["name"] == "motlens-config"
        assert job["spec"]["concurrencyPolicy"] == "Forbid"
        # every job downloads MLflow artifacts (reference bundle, golden gate): S3 credentials
        assert {"secretRef": {"name": "motlens-s3", "optional": True}} in container["envFrom"]
    for job, canary_mode in ((drift, False), (canary, True)):
        (container,) = job["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
        env = {k: v["value"] for k, v in _env(container).items() if k.startswith("MOTLENS_DRIFT_") and "value" in v}
        settings = DriftSettings(**{k.removeprefix("MOTLENS_DRIFT_").lower(): v for k, v in env.items()})
        assert set(env) <= {f"MOTLENS_DRIFT_{f.upper()}" for f in DriftSettings.model_fields}  # real settings
        assert settings.verdict_exit_codes is False  # a verdict is no failed Job (no rerun, no KubeJobFailed)
        assert ("--canary" in container["args"]) is canary_mode
        assert settings.skip_without_canary is canary_mode
    drift_container = drift["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert drift_container["args"][0] == "drift"
    assert any(name.startswith("MOTLENS_DRIFT_") for name in _env(drift_container))
    promo_container = promotion["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert promo_container["command"] + promo_container["args"] == ["motlens", "promote", "auto", "--target", "k8s"]
    # the audit names the job and its pod, not "unknown" (no $USER, no passwd entry for uid 10001);
    # $(POD_NAME) expands only from a variable defined before it
    names = [e["name"] for e in promo_container["env"]]
    actor = _env(promo_container)["MOTLENS_PROMOTE_ACTOR"]["value"]
    assert actor == "cronjob/motlens-promotion@$(POD_NAME)"
    assert names.index("POD_NAME") < names.index("MOTLENS_PROMOTE_ACTOR")
    assert _env(promo_container)["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_config_and_secret_references(built, overlay: str) -> None:
    """Every ConfigMap key referenced exists in the build; Secrets are referenced, never shipped."""
    docs = built[overlay]
    configmaps = {c["metadata"]["name"]: c.get("data", {}) for c in objects(docs, "ConfigMap")}
    assert objects(docs, "Secret") == []
    secrets = set()
    clickhouse_secrets: dict[str, set[str]] = {}
    for owner, spec in pod_specs(docs):
        for container in spec["containers"]:
            for env in container.get("env", []):
                ref = env.get("valueFrom", {})
                if "configMapKeyRef" in ref:
                    cm = ref["configMapKeyRef"]
                    assert cm["key"] in configmaps.get(cm["name"], {}), f"{owner}: {cm} not in the build"
                if "secretKeyRef" in ref:
                    secrets.add(ref["secretKeyRef"]["name"])
                    if env["name"].startswith("MOTLENS_CLICKHOUSE_"):
                        clickhouse_secrets.setdefault(owner, set()).add(ref["secretKeyRef"]["name"])
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    secrets.add(source["secretRef"]["name"])
    assert secrets == {"motlens-clickhouse", "motlens-clickhouse-jobs", "motlens-s3"}
    # least privilege: the internet-facing predictor holds only its INSERT-only user; the jobs' reader
    # (which sees every logged text) is never mounted into it, and no pod holds both
    assert clickhouse_secrets == {
        owner: {"motlens-clickhouse" if owner.startswith("InferenceService/") else "motlens-clickhouse-jobs"}
        for owner, _ in pod_specs(docs)
    }
    docs_text = (MANIFESTS.parent / "docs" / "deploy.md").read_text()
    for name in secrets:
        assert f"secret generic {name}" in docs_text, f"docs/deploy.md does not say how to create {name}"



def test_promotion_gitops_target_round_trip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The promotion CLI's GitOps target reads these overlays and rewrites rollout.yaml: canary at 10%,
    promote and roll back all build, validate against the CRD and read back as written."""
    from promotion.settings import PromoteSettings
    from promotion.targets import GitOpsTarget

    kustomize(MANIFESTS / "overlays" / "cpu")  # skips when kubectl is absent
    kubectl_dir = str(Path(find_tool("kubectl")).parent)  # the target looks kubectl up on PATH
    monkeypatch.setenv("PATH", kubectl_dir + os.pathsep + os.environ.get("PATH", ""))
    root = _overlay_copy(tmp_path)
    target = GitOpsTarget(PromoteSettings(target="gitops", manifests_dir=root, overlay="cpu"))
    start = target.read()
    assert start.storage_uri == isvc_container(_isvc(kustomize(MANIFESTS / "base")))["env"][0]["value"]
    assert not start.canary_active
    canary_uri = "s3://mlflow-artifacts/1/canaryrun/artifacts/model"
    for desired in (start.with_canary("7", canary_uri, 10), start.with_canary("7", canary_uri, 10).promoted(),
                    start.with_canary("7", canary_uri, 10).rolled_back()):
        target.apply(desired)
        isvc = _isvc(kustomize(root / "overlays" / "cpu"))
        assert isvc_errors(isvc) == []
        assert target.read() == desired
        assert isvc_container(isvc)["env"][0]["value"] == desired.storage_uri
