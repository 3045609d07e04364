"""The rollout state of the InferenceService and the patches that move it.

Contract (docs/architecture.md "KServe storage URI and rollout patches"): ``spec.predictor.containers[0]``
is ``kserve-container`` whose ``env[0]`` is ``STORAGE_URI`` and ``env[1]`` the sha256 its bundle.json
must have (``MOTLENS_SERVE_MODEL_SHA256``, the version's registry tag; "" = not pinned);
``spec.predictor.canaryTrafficPercent`` plus the annotations below carry the promotion state. During a
canary the spec holds the *canary* storage URI and digest (KServe's latest revision takes
``canaryTrafficPercent``), and the production ones are kept in annotations so a rollback can restore them.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field, fields, replace
from typing import Any

ANN_PROD_VERSION = "motlens.io/production-version"
ANN_PROD_URI = "motlens.io/production-storage-uri"
ANN_PROD_SHA = "motlens.io/production-bundle-sha256"
ANN_CANARY_VERSION = "motlens.io/canary-version"
CONTAINER = "kserve-container"
STORAGE_ENV = "STORAGE_URI"
DIGEST_ENV = "MOTLENS_SERVE_MODEL_SHA256"
API_GROUP, API_VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"


class RolloutError(Exception):
    """The live object does not follow the rollout contract, or a requested change is invalid."""


@dataclass(frozen=True)
class RolloutState:
    """What serves where, as read from (or written to) a target."""

    storage_uri: str | None  # spec STORAGE_URI: the latest revision (the canary while one runs)
    production_version: str | None = None
    production_uri: str | None = None
    canary_version: str | None = None
    percent: int | None = None  # canaryTrafficPercent; None when the field is absent
    bundle_sha256: str | None = None  # spec MOTLENS_SERVE_MODEL_SHA256: the digest storage_uri must have
    production_sha256: str | None = None
    traffic: str = field(default="", compare=False)  # observed traffic status, for people
    not_ready: str = field(default="", compare=False)  # why the target is not ready ("" when it is)
    loading: str = field(default="", compare=False)  # what the target is loading now: its state is in flux
    #: the predictor's latest created and latest ready revisions in KServe's status (None: not known,
    #: e.g. a rendered manifest or the local server)
    latest_created: str | None = field(default=None, compare=False)
    latest_ready_revision: str | None = field(default=None, compare=False)

    @property
    def canary_active(self) -> bool:
        return self.canary_version is not None

    @property
    def canary_uri(self) -> str | None:
        return self.storage_uri if self.canary_active else None

    @property
    def serving_production_uri(self) -> str | None:
        """The production URI: the spec's while no canary runs (what KServe serves, a hand edit
        included), else the annotation kept for a rollback."""
        return self.production_uri if self.canary_active else self.storage_uri

    @property
    def serving_production_sha256(self) -> str | None:
        """The production bundle digest, read like :attr:`serving_production_uri`."""
        return self.production_sha256 if self.canary_active else self.bundle_sha256

    def with_canary(self, version: str, uri: str, percent: int, sha256: str | None = None) -> RolloutState:
        check_percent(percent)
        return replace(
            self,
            production_version=self.production_version,
            production_uri=self.serving_production_uri,
            production_sha256=self.serving_production_sha256,
            canary_version=version,
            storage_uri=uri,
            bundle_sha256=sha256,
            percent=percent,
        )

    def with_percent(self, percent: int) -> RolloutState:
        check_percent(percent)
        return replace(self, percent=percent)

    def promoted(self) -> RolloutState:
        """The canary becomes production; canaryTrafficPercent removed."""
        return replace(
            self,
            production_version=self.canary_version,
            production_uri=self.storage_uri,
            production_sha256=self.bundle_sha256,
            canary_version=None,
            percent=None,
        )

    def rolled_back(self) -> RolloutState:
        """The previous production spec restored; canaryTrafficPercent kept at 0. Without the field
        KServe routes 100 % to Knative's latest *ready* revision, which is the rejected canary's until
        the restored spec's new revision is ready (minutes of a cold model load); at 0 the revision
        last rolled out (production's) keeps all traffic. :meth:`settled` removes it later."""
        if not self.serving_production_uri:
            raise RolloutError(
                f"cannot roll back: the production storage URI is unknown (annotation {ANN_PROD_URI} missing)"
            )
        return replace(
            self,
            storage_uri=self.serving_production_uri,
            bundle_sha256=self.serving_production_sha256,
            canary_version=None,
            percent=0,
        )

    @property
    def pinned_after_rollback(self) -> bool:
        """No canary, and canaryTrafficPercent still 0 from a rollback (:meth:`rolled_back`)."""
        return not self.canary_active and self.percent == 0

    def restored_ready(self, rolled_back: str | None) -> bool | None:
        """After a rollback: whether KServe reports the restored spec's revision ready, i.e. the latest
        created revision is the latest ready one and is not ``rolled_back`` (the revision the canary
        served, recorded by the rollback: a status from before the restored revision existed names it);
        None when the target reports no revisions."""
        if self.latest_created is None:
            return None
        return self.latest_created == self.latest_ready_revision and self.latest_created != rolled_back

    def settled(self) -> RolloutState:
        """canaryTrafficPercent removed once the restored revision is ready: it takes all traffic."""
        return replace(self, percent=None)

    def deployed(self, version: str, uri: str, sha256: str | None = None) -> RolloutState:
        """Straight to production (bootstrap or forced), no canary."""
        return RolloutState(
            storage_uri=uri,
            production_version=version,
            production_uri=uri,
            bundle_sha256=sha256,
            production_sha256=sha256,
        )

    def annotations(self) -> dict[str, str | None]:
        return {
            ANN_PROD_VERSION: self.production_version,
            ANN_PROD_URI: self.production_uri,
            ANN_PROD_SHA: self.production_sha256,
            ANN_CANARY_VERSION: self.canary_version,
        }

    def describe(self) -> str:
        if self.production_version is None and not self.serving_production_uri and not self.canary_active:
            return "nothing serving"
        prod = f"production v{self.production_version or '?'}"
        if not self.canary_active:
            return f"{prod} at 100%"
        pct = self.percent or 0
        return f"{prod} at {100 - pct}%, canary v{self.canary_version} at {pct}%"


#: the rollout fields a target holds, as people read them
_FIELD_NAMES = {
    "storage_uri": "STORAGE_URI",
    "bundle_sha256": DIGEST_ENV,
    "percent": "canaryTrafficPercent",
    "production_version": ANN_PROD_VERSION,
    "production_uri": ANN_PROD_URI,
    "production_sha256": ANN_PROD_SHA,
    "canary_version": ANN_CANARY_VERSION,
}


def differences(a: RolloutState, b: RolloutState) -> list[str]:
    """The rollout fields in which ``a`` and ``b`` differ, as ``NAME: A → B`` (absent: ``absent``)."""
    out = []
    for f in fields(RolloutState):
        if f.compare and (x := getattr(a, f.name)) != (y := getattr(b, f.name)):
            out.append(f"{_FIELD_NAMES[f.name]}: {'absent' if x is None else x} → {'absent' if y is None else y}")
    return out


def check_percent(percent: int) -> int:
    if isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100:
        raise RolloutError(f"canary percent must be an integer from 0 to 100, got {percent!r}")
    return percent


def kserve_container(isvc: dict[str, Any]) -> dict[str, Any]:
    """``spec.predictor.containers[0]``, checked against the contract."""
    containers = ((isvc.get("spec") or {}).get("predictor") or {}).get("containers") or []
    if not containers or containers[0].get("name") != CONTAINER:
        raise RolloutError(f"InferenceService spec.predictor.containers[0] must be {CONTAINER!r}")
    env = containers[0].get("env") or []
    if not env or env[0].get("name") != STORAGE_ENV:
        raise RolloutError(f"InferenceService {CONTAINER} env[0] must be {STORAGE_ENV}")
    return containers[0]


def _digest_env(container: dict[str, Any]) -> dict[str, Any] | None:
    return next((e for e in container.get("env") or [] if e.get("name") == DIGEST_ENV), None)


def state_from_isvc(isvc: dict[str, Any]) -> RolloutState:
    """Read the rollout state of a live (or rendered) InferenceService."""
    container = kserve_container(isvc)
    ann = (isvc.get("metadata") or {}).get("annotations") or {}
    percent = isvc["spec"]["predictor"].get("canaryTrafficPercent")
    if percent is not None and (isinstance(percent, bool) or not isinstance(percent, int)):
        raise RolloutError(f"InferenceService canaryTrafficPercent must be an integer, got {percent!r}")
    digest = _digest_env(container)
    return RolloutState(
        storage_uri=container["env"][0].get("value"),
        production_version=ann.get(ANN_PROD_VERSION),
        production_uri=ann.get(ANN_PROD_URI),
        canary_version=ann.get(ANN_CANARY_VERSION),
        percent=percent,
        bundle_sha256=(digest or {}).get("value") or None,
        production_sha256=ann.get(ANN_PROD_SHA) or None,
        traffic=traffic_status(isvc),
        latest_created=_revision(isvc, "latestCreatedRevision"),
        latest_ready_revision=_revision(isvc, "latestReadyRevision"),
    )


def _revision(isvc: dict[str, Any], key: str) -> str | None:
    """A revision name from ``status.components.predictor`` (KServe copies it from the Knative
    Service; its ``observedGeneration`` is the Knative Service's, not the InferenceService's, so
    only the names tell which revision is which)."""
    predictor = ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}
    return str(predictor[key]) if predictor.get(key) else None


def traffic_status(isvc: dict[str, Any]) -> str:
    """KServe's observed traffic split (``status.components.predictor.traffic``) and readiness."""
    status = isvc.get("status") or {}
    traffic = ((status.get("components") or {}).get("predictor") or {}).get("traffic") or []
    parts = [
        f"{t.get('revisionName', '?')}={t.get('percent', 0)}%{' (latest)' if t.get('latestRevision') else ''}"
        for t in traffic
    ]
    ready = next((c.get("status") for c in status.get("conditions") or [] if c.get("type") == "Ready"), None)
    if ready is not None:
        parts.append(f"Ready={ready}")
    return ", ".join(parts)


def merge_patch(live_isvc: dict[str, Any], desired: RolloutState) -> dict[str, Any]:
    """JSON merge patch (RFC 7386) taking ``live_isvc`` to ``desired``; empty when nothing changes.

    A merge patch replaces lists, so a changed STORAGE_URI or digest is written as the full live
    container list with only those two env values changed (the digest's entry added as ``env[1]`` to
    an InferenceService created before digests were pinned).
    """
    live = state_from_isvc(live_isvc)
    patch: dict[str, Any] = {}
    live_ann = (live_isvc.get("metadata") or {}).get("annotations") or {}
    ann = {k: v for k, v in desired.annotations().items() if live_ann.get(k) != v}
    if ann:
        patch["metadata"] = {"annotations": ann}
    predictor: dict[str, Any] = {}
    if live.percent != desired.percent:
        predictor["canaryTrafficPercent"] = desired.percent
    if (live.storage_uri, live.bundle_sha256) != (desired.storage_uri, desired.bundle_sha256):
        containers = copy.deepcopy(live_isvc["spec"]["predictor"]["containers"])
        containers[0]["env"][0]["value"] = desired.storage_uri
        digest = _digest_env(containers[0])
        if digest is None:
            digest = {"name": DIGEST_ENV}
            containers[0]["env"].insert(1, digest)
        digest.pop("valueFrom", None)
        digest["value"] = desired.bundle_sha256 or ""
        predictor["containers"] = containers
    if predictor:
        patch["spec"] = {"predictor": predictor}
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 merge-patch application (what the API server does), for local rendering."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = apply_merge_patch(out.get(k), v)
    return out


def _pointer(key: str) -> str:
    return key.replace("~", "~0").replace("/", "~1")


#: Contract assertions kept at the top of every ``rollout.yaml`` (the ops below rely on them).
CONTRACT_TESTS: tuple[dict[str, Any], ...] = (
    {"op": "test", "path": "/spec/predictor/containers/0/name", "value": CONTAINER},
    {"op": "test", "path": "/spec/predictor/containers/0/env/0/name", "value": STORAGE_ENV},
    {"op": "test", "path": "/spec/predictor/containers/0/env/1/name", "value": DIGEST_ENV},
)
_PERCENT_PATH = "/spec/predictor/canaryTrafficPercent"
_URI_PATH = "/spec/predictor/containers/0/env/0/value"
_DIGEST_PATH = "/spec/predictor/containers/0/env/1/value"
_ANN_PREFIX = "/metadata/annotations/"


def json6902_ops(state: RolloutState) -> list[dict[str, Any]]:
    """The overlay's ``rollout.yaml``: JSON6902 ops that put ``state`` onto the base InferenceService.

    With no rollout in progress ``canaryTrafficPercent`` is removed; ``add`` then ``remove`` does that
    whether or not the base sets the field.
    """
    ops: list[dict[str, Any]] = [dict(op) for op in CONTRACT_TESTS]
    ops.append({"op": "replace", "path": _URI_PATH, "value": state.storage_uri})
    ops.append({"op": "replace", "path": _DIGEST_PATH, "value": state.bundle_sha256 or ""})
    for key, value in state.annotations().items():
        path = f"{_ANN_PREFIX}{_pointer(key)}"
        ops.append({"op": "add", "path": path, "value": value if value is not None else ""})
        if value is None:
            ops.append({"op": "remove", "path": path})
    if state.percent is None:
        ops += [{"op": "add", "path": _PERCENT_PATH, "value": 100}, {"op": "remove", "path": _PERCENT_PATH}]
    else:
        ops.append({"op": "add", "path": _PERCENT_PATH, "value": state.percent})
    return ops


#: plain scalars that YAML 1.2 (kustomize, kubectl) reads as no string but PyYAML (YAML 1.1) writes
#: unquoted, e.g. ``0o17`` (an octal int) or ``1e5`` (a float)
_YAML12_NOT_STRING = re.compile(
    r"[-+]?(0o[0-7]+|0x[0-9a-fA-F]+|[0-9]+|(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?|\.(inf|Inf|INF))"
    r"|\.(nan|NaN|NAN)|null|Null|NULL|~|true|True|TRUE|false|False|FALSE"
)


def rollout_yaml(header: str, state: RolloutState) -> str:
    """``rollout.yaml``: comment lines (``header``, each line of it made a comment, newlines in what it
    quotes cannot start YAML) then the JSON6902 ops of ``state``; every string is read back as written,
    by PyYAML and by kustomize's YAML 1.2 alike."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def string(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
        style = '"' if _YAML12_NOT_STRING.fullmatch(value) else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, string)
    ops = json6902_ops(state)
    body = yaml.dump(ops, Dumper=Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True)
    if yaml.safe_load(body) != ops:  # a representer above that lost something: never write it
        raise RolloutError("the rollout ops do not read back as written")
    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + body
