"""Helpers for the deployment tests: finding the CLI tools, building kustomizations, the KServe CRD."""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
MANIFESTS = REPO / "manifests"
OVERLAYS = ("cpu", "gpu")
CRD_PATH = REPO.parent / "shared" / "schemas" / "kserve" / "serving.kserve.io_inferenceservices.yaml"
if not CRD_PATH.is_file():  # a worktree outside /work: the shared schemas stay in /work/shared
    CRD_PATH = Path("/work/shared/schemas/kserve/serving.kserve.io_inferenceservices.yaml")
INSTALL_HINT = "run .ci/install-tools.sh (make tools)"


def find_tool(name: str) -> str | None:
    """A tool on PATH, else the one .ci/install-tools.sh put in .venv-tools/bin."""
    found = shutil.which(name)
    if found:
        return found
    local = REPO / ".venv-tools" / "bin" / name
    return str(local) if local.is_file() else None


@functools.cache
def _kubectl() -> str | None:
    kubectl = find_tool("kubectl")
    if kubectl is None:
        return None
    ok = subprocess.run([kubectl, "kustomize", "--help"], capture_output=True, timeout=60).returncode == 0
    return kubectl if ok else None


def kustomize(path: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize PATH`` as a list of objects; skips when kubectl is absent, fails on errors."""
    kubectl = _kubectl()
    if kubectl is None:
        pytest.skip(f"kubectl with kustomize not found: {INSTALL_HINT}")
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {path} failed:\n{out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def promtool() -> str:
    tool = find_tool("promtool")
    if tool is None:
        pytest.skip(f"promtool not found (Debian package prometheus): {INSTALL_HINT}")
    return tool


def objects(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = objects(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def isvc_container(isvc: dict[str, Any]) -> dict[str, Any]:
    return isvc["spec"]["predictor"]["containers"][0]


def pod_specs(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """(owner, pod spec) of every workload: the InferenceService predictor and the CronJobs."""
    specs = [(f"InferenceService/{d['metadata']['name']}", d["spec"]["predictor"])
             for d in objects(docs, "InferenceService")]
    specs += [(f"CronJob/{d['metadata']['name']}", d["spec"]["jobTemplate"]["spec"]["template"]["spec"])
              for d in objects(docs, "CronJob")]
    return specs


def _strict(node: Any) -> Any:
    """The CRD schema as the API server applies it with strict field validation: unknown fields are
    errors (``additionalProperties: false`` unless ``x-kubernetes-preserve-unknown-fields``), and
    ``x-kubernetes-int-or-string`` means integer or string."""
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _strict(v) for k, v in node.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.get("x-kubernetes-int-or-string") and "anyOf" not in out and "type" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


@functools.cache
def isvc_schema() -> dict[str, Any]:
    """The v1beta1 openAPIV3Schema of KServe's InferenceService CRD (loaded once: ~2 MB of YAML)."""
    if not CRD_PATH.is_file():
        pytest.skip(f"KServe CRD schema not found at {CRD_PATH}")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(CRD_PATH.read_text(), Loader=loader)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    return _strict(version["schema"]["openAPIV3Schema"])


@functools.cache
def _isvc_validator() -> Any:
    import jsonschema

    return jsonschema.Draft7Validator(isvc_schema())


def isvc_errors(isvc: dict[str, Any]) -> list[str]:
    """Schema violations of an InferenceService, as readable 'path: message' lines."""
    validator = _isvc_validator()
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in sorted(validator.iter_errors(isvc), key=lambda e: list(map(str, e.absolute_path)))
    ]
