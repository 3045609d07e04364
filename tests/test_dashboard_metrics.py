"""The Grafana dashboard and the alerts use only metrics that really exist: the predictor's own, served
on its /metrics by a running `motlens serve` started exactly as the InferenceService starts it, and the
drift/promotion jobs' metrics, which must be defined by those packages' code."""

from __future__ import annotations

import ast
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from manifest_helpers import MANIFESTS, REPO, isvc_container, kustomize, one, promtool

DASHBOARD = MANIFESTS / "monitoring" / "dashboards" / "motlens.json"
RULES = MANIFESTS / "monitoring" / "prometheusrule.yaml"
JOB_PACKAGES = ("drift", "promotion")
METRIC = re.compile(r"\b(?:motlens_[a-z0-9_]+|request_[a-z]+_seconds(?:_bucket|_sum|_count)?)\b")
SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")
# What the dashboard must show (issue: deployment and monitoring) → a metric that shows it.
REQUIRED_PANELS = {
    "throughput": "motlens_requests_total",
    "latency": "motlens_request_latency_seconds_bucket",
    "batch size": "motlens_batch_size_bucket",
    "cache hit rate": "motlens_cache_hits_total",
    "GPU memory": "motlens_gpu_memory_reserved_bytes",
    "drift score": "motlens_drift_score",
    "version in service": "motlens_model_info",
}
TEXTS = ["Nearside Front Brake pipe corroded (1.1.11 (c))", "Horn not working (7.5 (a))"]


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana receives it: from the ConfigMap in the monitoring build."""
    docs = kustomize(MANIFESTS / "monitoring")
    cm = one(docs, "ConfigMap", "motlens-grafana-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    return json.loads(cm["data"]["motlens.json"])


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dash["panels"] if p["type"] != "row"]


def dashboard_exprs(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in panels(dash) for t in p["targets"]]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["spec"]["groups"] for r in g["rules"]]


def used_metrics(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC.findall(e)}


def family(name: str, known: set[str]) -> str:
    """The metric family a series name belongs to (``x_bucket`` → ``x`` when ``x`` is known)."""
    for suffix in SUFFIXES:
        if name.endswith(suffix) and name[: -len(suffix)] in known:
            return name[: -len(suffix)]
    return name


def documented_metrics() -> set[str]:
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`(motlens_[a-z0-9_]+)", section))


def test_dashboard_shows_what_on_call_needs() -> None:
    dash = dashboard()
    assert dash["uid"] and dash["title"] and panels(dash)
    used = used_metrics(dashboard_exprs(dash))
    missing = {what: m for what, m in REQUIRED_PANELS.items() if m not in used}
    assert not missing
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels(dash):
        assert p["title"] and p["targets"] and p["datasource"]["uid"] == "${datasource}", p["title"]


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (Grafana's variables replaced by sample values)."""
    exprs = [e.replace("$__rate_interval", "5m").replace("$namespace", "motlens") for e in dashboard_exprs(dashboard())]
    exprs = [re.sub(r"^label_values\((\w+), \w+\)$", r"\1", e) for e in exprs]
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                         for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard.yaml").write_text(yaml.safe_dump(rules))
    out = subprocess.run([promtool(), "check", "rules", str(tmp_path / "dashboard.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_used_metrics_are_documented() -> None:
    documented = documented_metrics()
    used = used_metrics(dashboard_exprs(dashboard()) + rule_exprs())
    undocumented = {m for m in used if m.startswith("motlens_") and family(m, documented) not in documented}
    assert not undocumented, f"not in docs/architecture.md 'Metrics': {sorted(undocumented)}"


# ------------------------------------------------------------------------------------------------
# The cross-check against real code.


def job_metric_names() -> set[str]:
    """Metric names the drift and promotion packages define (prometheus_client constructors)."""
    names: set[str] = set()
    for package in JOB_PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "id", getattr(node.func, "attr", None)) in {"Gauge", "Counter", "Histogram",
                                                                                       "Summary", "Info"}
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    names.add(node.args[0].value)
    return names


def exposed_names(text: str) -> set[str]:
    """Series names a Prometheus scrape of ``text`` yields (families without samples included)."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
        if fam.type == "counter":
            names.add(fam.name if fam.name.endswith("_total") else fam.name + "_total")
        if fam.type in ("histogram", "summary"):
            names.update(fam.name + s for s in ("_sum", "_count"))
        if fam.type == "histogram":
            names.add(fam.name + "_bucket")
    return names


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_like_the_overlay(overlay: str, bundle_root: Path, home: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """`motlens serve` as the overlay's InferenceService runs it (command, args, literal env), with
    ``bundle_root`` in place of /mnt/models and a free port: yields (base URL, the container spec)."""
    docs = kustomize(MANIFESTS / "overlays" / overlay)
    container = isvc_container(one(docs, "InferenceService", "mot-defects"))
    port = _free_port()
    args = [str(bundle_root) if a == "/mnt/models" else a for a in container["args"]]
    args[args.index("--http-port") + 1] = str(port)
    env = {**os.environ, **{e["name"]: e["value"] for e in container["env"] if "value" in e},
           "MOTLENS_HOME": str(home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("MOTLENS_CLICKHOUSE_URL", None)  # embedded prediction log (local Parquet)
    log_path = home / "serve.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "motlens.cli", *args], env=env, cwd=home,
                                stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        ready = container["readinessProbe"]["httpGet"]["path"]
        deadline = time.monotonic() + 300
        try:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"motlens serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
                try:
                    if httpx.get(base + ready, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"not ready within 300 s:\n{log_path.read_text()[-4000:]}")
                time.sleep(0.5)
            yield base, container
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def predictor(tiny_bundle, tmp_path_factory):
    """The cpu overlay's predictor serving the tiny bundle."""
    with serve_like_the_overlay("cpu", tiny_bundle.root, tmp_path_factory.mktemp("predictor-home")) as served:
        yield served


@pytest.mark.slow
def test_probes_answer_on_a_running_predictor(predictor) -> None:
    base, container = predictor
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        path = container[probe]["httpGet"]["path"]
        assert httpx.get(base + path, timeout=10).status_code == 200, f"{probe} {path}"


@pytest.mark.slow
def test_every_used_metric_is_exported(predictor) -> None:
    base, _ = predictor
    infer = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
    assert httpx.post(f"{base}/v2/models/mot-defects/infer", json=infer, timeout=60).status_code == 200
    assert httpx.post(f"{base}/v1/models/mot-defects:predict", json={"instances": TEXTS}, timeout=60).status_code == 200
    assert httpx.post(f"{base}/v2/models/mot-defects/infer", json={"inputs": []}, timeout=60).status_code == 400
    scraped = httpx.get(f"{base}/metrics", timeout=10)
    assert scraped.status_code == 200
    exposed = exposed_names(scraped.text)
    jobs = job_metric_names()
    used = used_metrics(dashboard_exprs(dashboard()) + rule_exprs())
    missing = sorted(m for m in used if m not in exposed and family(m, jobs) not in jobs)
    assert not missing, f"used by the dashboard/alerts but exported by neither the predictor nor the jobs: {missing}"
    # and the predictor really counted the requests it answered
    assert re.search(r'^motlens_requests_total\{[^}]*outcome="ok"[^}]*\} [1-9]', scraped.text, re.M)


@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_overlay_predictor_serves_fp16_and_reports_gpu_memory(tiny_bundle, tmp_path) -> None:
    """The gpu overlay's settings (cuda, float16) pass the golden check and fill the GPU gauges."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with serve_like_the_overlay("gpu", tiny_bundle.root, tmp_path) as (base, _):
        infer = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(TEXTS)], "data": TEXTS}]}
        assert httpx.post(f"{base}/v2/models/mot-defects/infer", json=infer, timeout=60).status_code == 200
        text = httpx.get(f"{base}/metrics", timeout=10).text
    values = {m.group(1): float(m.group(2))
              for m in re.finditer(r"^(motlens_gpu_memory_\w+_bytes) (\S+)$", text, re.M)}
    assert values["motlens_gpu_memory_total_bytes"] > 0
    assert 0 < values["motlens_gpu_memory_reserved_bytes"] <= values["motlens_gpu_memory_total_bytes"]
    assert re.search(r'^motlens_model_info\{[^}]*device="cuda[^"]*"[^}]*\} 1', text, re.M)
