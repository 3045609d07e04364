"""Shared helpers for the promotion tests (real MLflow registry, real prediction log, real kubectl)."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from manifest_helpers import isvc_errors

from promotion.local_target import ADMIN

REPO = Path(__file__).resolve().parents[1]
#: the held-out split every make_env version records
SPLIT = {"split.seed": 0, "split.scheme": "test", "split.holdout_fraction": 0.2, "split.max_texts": None}


@dataclass
class Env:
    """A tmp copy of manifests/, a registry with versions 1..n, the state dir holding the prediction log."""

    registry: Any
    manifests: Path
    home: Path

    def settings(self, **kw: Any) -> Any:
        from promotion.settings import PromoteSettings

        base = {"target": "gitops", "manifests_dir": self.manifests, "min_samples": 20, "min_step_interval_s": 0}
        return PromoteSettings(**{**base, **kw})


def make_env(registry: Any, bundle_root: Path, tmp_path: Path, monkeypatch: Any, metrics: list[float]) -> Env:
    """Register one version per entry of ``metrics`` (section_macro_f1) and point MOTLENS_* at tmp dirs.

    Every run records the same held-out split (``split.seed``/``split.scheme``), so the offline gate
    compares their metrics (docs/promotion.md "Gates")."""
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    for i, m in enumerate(metrics):
        registry.register_bundle(bundle_root, metrics={"section_macro_f1": m},
                                  params={"i": i, **SPLIT}, alias=None)  # fmt: skip
    manifests = tmp_path / "manifests"
    shutil.copytree(REPO / "manifests", manifests)
    return Env(registry, manifests, registry.state.home)


#: error-free requests a side logs to pass the live gate at its defaults: with production at 0 % errors
#: the canary's limit is 0.5 %, and 0 errors in n requests bound the rate under it at 95 % from n ≈ 730
HEALTHY = 800


def log_traffic(version: str, slot: str, n: int, *, errors: int = 0, latency_ms: float = 5.0) -> None:
    """Write ``n`` prediction-log rows (``errors`` of them server errors) through the real writer."""
    import predlog
    from predlog.records import PredictionRecord

    writer = predlog.open_writer()
    rows = [
        PredictionRecord(request_id=f"{slot}-{version}-{i}-{datetime.now(UTC).timestamp()}", item_index=0,
                         model_name="mot-defects", model_version=version, slot=slot, text="Brake pipe corroded",
                         latency_ms=latency_ms, status="server_error" if i < errors else "ok",
                         section="1 Brakes", severity="major")
        for i in range(n)
    ]
    writer.submit(rows)
    assert writer.flush(30)
    writer.close(30)


def drift_report(version: str, detected: bool, n: int = 500, at: datetime | None = None) -> None:
    import predlog

    now = at or datetime.now(UTC)
    predlog.open_reader().insert_drift_report({
        "ts": now, "model_name": "mot-defects", "model_version": version, "slot": "canary",
        "reference": "bundle", "window_start": now, "window_end": now, "n_current": n, "n_reference": n,
        "drift_detected": detected, "drift_share": 0.8 if detected else 0.0, "scores": {"embedding": 0.5},
        "report_path": "", "run_id": "", "details": "{}",
    })


def render(overlay: Path) -> dict[str, Any]:
    out = subprocess.run(["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True)
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return next(d for d in docs if d["kind"] == "InferenceService")


def validate_isvc(isvc: dict[str, Any]) -> None:
    """Validate against the KServe CRD's v1beta1 schema with the API server's strict field validation
    (unknown fields such as a misspelled ``canaryTraficPercent`` are errors; raises on any violation)."""
    errors = isvc_errors(isvc)
    assert not errors, errors[:5]


def kubectl_patch_local(isvc: dict[str, Any], patch: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """``kubectl patch --local --type merge``: what the API server makes of the k8s target's patch body."""
    src = tmp / "live.yaml"
    src.write_text(yaml.safe_dump(isvc))
    out = subprocess.run(
        ["kubectl", "patch", "--local", "-f", str(src), "--type", "merge", "-p", json.dumps(patch), "-o", "yaml"],
        capture_output=True, text=True, check=True,
    )
    return yaml.safe_load(out.stdout)


class FakeServe:
    """The admin API of a two-slot `motlens serve`: a slot load takes ``load_s`` (the model loads and
    passes its golden check) and swaps at the end, as the real one does before it answers."""

    def __init__(self, production: str, load_s: float = 0.0) -> None:
        self.slots: dict[str, dict[str, Any]] = {
            "production": {"version": production, "ref": f"models:/mot-defects/{production}"},
            "canary": {"version": None, "ref": None},
        }
        self.percent = 0.0
        self.load_s = load_s
        self.took_effect: list[tuple[str, datetime]] = []  # (what, when the server started serving it)
        self.lock = threading.Lock()
        self.reason: str | None = None  # why it is not ready (starting, loading, stopping); None: ready

    def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        with self.lock:
            op = path.removeprefix(ADMIN)
            if method == "GET" and op == "/slots":
                return self.status()
            if op.startswith("/slots/") and op.endswith("/load"):
                slot = op.split("/")[2]
                time.sleep(self.load_s)
                ref = body["ref"]
                self.slots[slot] = {"version": ref.rsplit("/", 1)[1], "ref": ref}
            elif op == "/canary/percent":
                self.percent = float(body["percent"])
            elif op == "/promote":
                self.slots["production"], self.slots["canary"] = self.slots["canary"], {"version": None, "ref": None}
                self.percent = 0.0
            elif op == "/rollback":
                self.slots["canary"], self.percent = {"version": None, "ref": None}, 0.0
            else:
                raise AssertionError(f"unexpected admin call {method} {path}")
            self.took_effect.append((op, datetime.now(UTC)))
            time.sleep(0.01)  # the answer travels back after the swap
            return self.status()

    def status(self) -> dict[str, Any]:
        return {"slots": {k: dict(v) for k, v in self.slots.items()}, "canary_percent": self.percent,
                "ready": self.reason is None, "reason": self.reason}  # fmt: skip


def local_rollout(
    registry: Any, bundle_root: Path, tmp_path: Path, monkeypatch: Any
) -> tuple[Env, FakeServe, Any, Any]:
    """A local target (a :class:`FakeServe` behind ``LocalTarget``'s admin calls) on which v2 was rolled out
    over v1 and promoted (so v2 records v1 as what it replaced): (env, serve, settings, target)."""
    from promotion.local_target import LocalTarget
    from promotion.workflow import Promoter

    env = make_env(registry, bundle_root, tmp_path, monkeypatch, [0.60, 0.65, 0.66])
    registry.set_alias("production", "1")
    serve = FakeServe("1")
    monkeypatch.setattr(
        LocalTarget, "_request", lambda self, method, path, body=None: serve.request(method, path, body)
    )
    settings = env.settings(target="local", local_url="http://127.0.0.1:1", golden_check=False)
    target = LocalTarget(settings)
    p = Promoter(settings, env.registry, target, force=True)
    p.canary_start("2", 10)
    p.canary_set(100)
    p.promote()
    return env, serve, settings, target
