"""Where the rollout state lives: the Kubernetes API, a GitOps overlay, or a local `motlens serve`.

Every target reads the live state first (a ``kubectl edit`` is respected, never assumed away),
turns a desired :class:`~promotion.rollout.RolloutState` into its own patch (shown by ``--dry-run``)
and applies it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

from motlens.atomic import atomic_write, remove_stale_temps
from promotion.locking import HeldLease, file_lock, lease_lock
from promotion.rollout import (
    API_GROUP,
    API_VERSION,
    PLURAL,
    RolloutError,
    RolloutState,
    merge_patch,
    rollout_yaml,
    state_from_isvc,
)
from promotion.settings import PromoteSettings

log = logging.getLogger(__name__)
#: kubectl's klog line before the message: E1129 17:03:39.830883   16637 run.go:72] "command failed" err=
_KLOG_ERR = re.compile(r'^[IWEF]\d{4} \S+\s+\d+ \S+\] "command failed" err=', re.M)
#: kustomize echoes a failing builtin's whole configuration: "… PatchTransformer with config: `path: …`: reason"
_ECHOED_CONFIG = re.compile(r" with config: `.*?`", re.S)


class TargetError(RuntimeError):
    """The target cannot be read or changed (no cluster access, missing files, …)."""


class TargetUnavailable(TargetError):
    """The target is down or busy for now (a local server restarting or loading a model): try again later."""


class Target(Protocol):
    name: str
    pins_digest: bool  # the rollout state carries each version's bundle digest (MOTLENS_SERVE_MODEL_SHA256)

    def describe(self) -> str: ...

    def read(self) -> RolloutState: ...

    def plan(self, desired: RolloutState) -> Any:
        """The patch that would take the live state to ``desired`` (what ``--dry-run`` prints)."""

    def apply(self, desired: RolloutState) -> Any:
        """Apply it; returns the patch applied (empty when nothing changed)."""

    def lock(self, *, blocking: bool) -> AbstractContextManager[None]: ...

    def check_lock(self) -> None:
        """Raise ``LockLost`` if the lock taken by :meth:`lock` was lost (only a Kubernetes Lease can be)."""

    def uri_for(self, version: str, artifact_uri: str) -> str:
        """What this target loads for a registry version."""


class K8sTarget:
    """The InferenceService through the Kubernetes API (in-cluster service account or kubeconfig)."""

    name = "k8s"
    pins_digest = True  # the pod's storage initializer has no registry: the spec carries the digest

    def __init__(self, settings: PromoteSettings) -> None:
        from motlens.cli import require

        require("kubernetes", "promote")
        from kubernetes import client, config

        try:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config(config_file=settings.kubeconfig, context=settings.kube_context)
        except (config.ConfigException, OSError) as e:
            raise TargetError(f"no cluster access: no in-cluster service account and no usable kubeconfig ({e})") from e
        self.settings = settings
        self.api = client.CustomObjectsApi()
        self._lease: HeldLease | None = None  # while this target holds its Lease

    def describe(self) -> str:
        return f"k8s inferenceservice {self.settings.namespace}/{self.settings.isvc_name}"

    def _error(self, what: str, e: Exception) -> TargetError:
        from kubernetes.client.exceptions import ApiException

        if isinstance(e, ApiException):
            if e.status == 404:
                return TargetError(f"{what}: not found")
            if e.status in (401, 403):
                return TargetError(f"{what}: not allowed ({e.status} {e.reason})")
            return TargetError(f"{what}: {e.status} {e.reason}")
        return TargetError(f"no cluster access: {what}: {e}")

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except (ApiException, OSError, HTTPError) as e:  # connection refused, DNS, TLS, timeouts
            raise self._error(f"cannot {what} {self.describe()}", e) from e

    def get(self) -> dict[str, Any]:
        s = self.settings
        return self._call(
            "read",
            self.api.get_namespaced_custom_object,
            API_GROUP,
            API_VERSION,
            s.namespace,
            PLURAL,
            s.isvc_name,
        )

    def read(self) -> RolloutState:
        return state_from_isvc(self.get())

    def plan(self, desired: RolloutState) -> dict[str, Any]:
        return merge_patch(self.get(), desired)

    def apply(self, desired: RolloutState) -> dict[str, Any]:
        s = self.settings
        self.check_lock()
        live = self.get()
        patch = merge_patch(live, desired)
        if patch:
            # resourceVersion makes the API server refuse (409) a patch computed from a stale read
            body = {
                **patch,
                "metadata": {
                    **patch.get("metadata", {}),
                    "resourceVersion": live["metadata"]["resourceVersion"],
                },
            }
            self._call(
                "patch",
                self.api.patch_namespaced_custom_object,
                API_GROUP,
                API_VERSION,
                s.namespace,
                PLURAL,
                s.isvc_name,
                body,
            )
        return patch

    @contextmanager
    def lock(self, *, blocking: bool) -> Iterator[None]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        s = self.settings
        name = f"{s.isvc_name}-promotion"
        held = lease_lock(
            self.api,
            s.namespace,
            name,
            lease_seconds=s.lease_seconds,
            blocking=blocking,
            clock_skew_s=s.clock_skew_s,
        )
        try:
            self._lease = held.__enter__()
        except (ApiException, OSError, HTTPError) as e:
            raise self._error(f"cannot take the Lease {s.namespace}/{name}", e) from e
        try:
            yield
        except BaseException as e:  # the body's error goes on (a lost Lease is logged, not raised over it)
            self._lease = None
            if not held.__exit__(type(e), e, e.__traceback__):
                raise
        else:
            self._lease = None
            held.__exit__(None, None, None)  # LockLost when the Lease was taken over meanwhile

    def check_lock(self) -> None:
        if self._lease is not None:
            self._lease.check()  # LockLost: another run took the Lease over, change nothing more

    def uri_for(self, version: str, artifact_uri: str) -> str:
        return artifact_uri


def kustomize_build(path: Path) -> list[dict[str, Any]]:
    """Render a kustomization with ``kubectl kustomize`` (or ``kustomize build``)."""
    import yaml

    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    else:
        raise TargetError("the gitops target renders overlays with kubectl or kustomize; install either")
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        log.debug("%s failed:\n%s", " ".join(cmd), done.stderr)
        reason = tool_error(done.stderr) or f"exit status {done.returncode}"
        raise TargetError(f"{' '.join(cmd)} failed: {reason}")
    try:
        return [d for d in yaml.safe_load_all(done.stdout) if d]
    except yaml.YAMLError as e:  # kubectl prints some values (`=`, `<<`) plain, which YAML 1.1 reads otherwise
        raise TargetError(f"{' '.join(cmd)}: its output does not parse: {' '.join(str(e).split())}") from e


def tool_error(stderr: str) -> str:
    """kubectl's or kustomize's failure on one line: the ``err`` of kubectl's klog line (quoted, or a
    ``<`` … ``>`` block) or what follows kustomize's ``Error:``, without the echoed builtin config."""
    text = stderr.strip()
    if m := _KLOG_ERR.search(text):
        text = text[m.end() :]
        if text.startswith('"'):  # Go-quoted, on one line
            line = text.splitlines()[0]
            try:
                text = json.loads(line)
            except ValueError:
                text = line.strip('"')
        else:
            text = text.removeprefix("<").split("\n >", 1)[0]
    elif "Error:" in text:
        text = text.split("Error:", 1)[1]
    return " ".join(_ECHOED_CONFIG.sub("", text).split())


def find_isvc(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    for d in docs:
        if d.get("kind") == "InferenceService" and d.get("metadata", {}).get("name") == name:
            return d
    raise TargetError(f"no InferenceService {name!r} in the rendered manifests")


ROLLOUT_HEADER = """\
Rollout state of mot-defects (JSON6902). Owned and rewritten by the promotion CLI
(`motlens promote … --target gitops`; see docs/promotion.md); do not edit by hand, run
`motlens promote canary set N --target gitops` instead. {summary}"""


class GitOpsTarget:
    """The overlay's ``rollout.yaml`` in a ``manifests/`` checkout, for Argo CD / Flux to sync.

    The live state is the rendered overlay (``kubectl kustomize``), i.e. exactly what the GitOps
    controller applies; a change rewrites ``rollout.yaml`` atomically (temp file + rename).
    """

    name = "gitops"
    pins_digest = True  # the pod's storage initializer has no registry: the spec carries the digest

    def __init__(self, settings: PromoteSettings) -> None:
        self.settings = settings
        self.overlay = settings.overlay_dir()
        self.file = self.overlay / "rollout.yaml"
        if not (self.overlay / "kustomization.yaml").is_file():
            raise TargetError(
                f"overlay {self.overlay} has no kustomization.yaml "
                f"(--manifests-dir or MOTLENS_PROMOTE_MANIFESTS_DIR: {settings.manifests_dir}; --overlay or "
                f"MOTLENS_PROMOTE_OVERLAY: {settings.overlay})"
            )
        if os.path.lexists(self.file) and not self.file.is_file():  # a directory, a dangling link, …
            raise TargetError(f"{self.file} is not a regular file: restore it from git")

    def describe(self) -> str:
        return f"gitops overlay {self.overlay}"

    def render(self) -> dict[str, Any]:
        return find_isvc(kustomize_build(self.overlay), self.settings.isvc_name)

    def read(self) -> RolloutState:
        try:
            state = state_from_isvc(self.render())
        except RolloutError as e:
            raise TargetError(f"{self.describe()}: {e}") from e
        return RolloutState(**{**state.__dict__, "traffic": "desired state in git (synced by Argo CD/Flux)"})

    def content(self, desired: RolloutState) -> str:
        return rollout_yaml(ROLLOUT_HEADER.format(summary=desired.describe()), desired)

    def plan(self, desired: RolloutState) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "content": self.content(desired),
            "merge_patch": merge_patch(self.render(), desired),
        }

    def apply(self, desired: RolloutState) -> dict[str, Any]:
        """Write the new rollout.yaml. This runs under :meth:`lock`, so no other write of it is in
        flight: temp files beside it are a killed run's, removed first (before a ``git add -A``)."""
        for stale in remove_stale_temps(self.file):
            log.info("removed %s, left by an interrupted write", stale)
        plan = self.plan(desired)
        if plan["merge_patch"]:
            atomic_write(self.file, plan["content"])
        return plan["merge_patch"]

    def lock(self, *, blocking: bool) -> AbstractContextManager[None]:
        return file_lock(self.overlay, blocking=blocking)

    def check_lock(self) -> None:
        """A file lock is held until released: nothing to check."""

    def uri_for(self, version: str, artifact_uri: str) -> str:
        return artifact_uri


def make_target(settings: PromoteSettings) -> Target:
    if settings.target == "k8s":
        return K8sTarget(settings)
    if settings.target == "gitops":
        return GitOpsTarget(settings)
    from promotion.local_target import LocalTarget

    return LocalTarget(settings)


def dumps(patch: Any) -> str:
    return json.dumps(patch, indent=2, sort_keys=True)
