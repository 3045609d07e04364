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
PODMONITOR = MANIFESTS / "monitoring" / "podmonitor.yaml"
JOB_PACKAGES = ("drift", "promotion")
# Where metrics are declared (prometheus_client constructors): the label names of a family the scrape
# shows without samples (a labelled counter nothing has counted yet) come from here.
METRIC_PACKAGES = ("predictor", "predlog", *JOB_PACKAGES)
METRIC_NAME = r"\b(?:motlens_[a-z0-9_]+|request_[a-z]+_seconds(?:_bucket|_sum|_count)?)\b"
METRIC = re.compile(METRIC_NAME)
SELECTOR = re.compile(rf"({METRIC_NAME})\s*\{{([^}}]*)\}}")
MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)\s*"([^"]*)"')
CLAUSE = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
# Labels every series gets from its target (Prometheus Operator's PodMonitor; the Pushgateway's job and
# instance under honor_labels), besides the PodMonitor's own relabelings.
TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance", "service"}
# The Pushgateway adds the drift job's grouping key (drift/job.py) to every metric of the group.
DRIFT_GROUPING = {"model_version", "slot"}
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


def _inside(text: str, start: int) -> str:
    """The text inside the parentheses that open at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return text[start + 1 : i]
    raise AssertionError(f"unbalanced parentheses: {text}")


def _introduced(expr: str) -> set[str]:
    """Labels ``expr`` adds itself: label_replace's destination, group_left/group_right's labels."""
    labels = {lab.strip() for group in re.findall(r"\bgroup_(?:left|right)\s*\(([^)]*)\)", expr)
              for lab in group.split(",")}  # fmt: skip
    for m in re.finditer(r"\blabel_replace\s*\(", expr):
        args = re.sub(r"\{[^}]*\}", "", _inside(expr, m.end() - 1))  # selectors' values are no arguments
        labels.update(re.findall(r'"([A-Za-z_]\w*)"', args)[:1])
    return labels - {""}


def label_uses(expr: str) -> list[tuple[str, str, str | None]]:
    """(metric, label, value or None) for every label a selector matches on (with its value for ``=``),
    ``label_values(metric, label)`` names, or a ``by``/``without`` clause names for each metric it
    aggregates (unless the aggregated expression adds that label itself)."""
    uses: list[tuple[str, str, str | None]] = []
    for sel in SELECTOR.finditer(expr):
        for m in MATCHER.finditer(sel.group(2)):
            exact = re.match(rf"{m.group(1)}\s*=\s*\"", m.group(0))
            uses.append((sel.group(1), m.group(1), m.group(2) if exact else None))
    uses += [(m.group(1), m.group(2), None) for m in re.finditer(r"label_values\((\w+),\s*(\w+)\)", expr)]
    for clause in CLAUSE.finditer(expr):
        rest = expr[clause.end() :]
        assert rest.lstrip().startswith("("), f"write `agg by (...) (expr)`: {expr}"
        inner = _inside(expr, clause.end() + len(rest) - len(rest.lstrip()))
        added = _introduced(inner)
        uses += [(metric, lab.strip(), None) for metric in METRIC.findall(inner)
                 for lab in clause.group(1).split(",") if lab.strip() and lab.strip() not in added]  # fmt: skip
    return uses


def metric_constructors(packages: tuple[str, ...]) -> Iterator[tuple[str, ast.Call]]:
    """(metric name, call) for every prometheus_client constructor in the packages' code."""
    for package in packages:
        for path in (REPO / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Call)
                    and getattr(node.func, "id", getattr(node.func, "attr", None))
                    in {"Gauge", "Counter", "Histogram", "Summary", "Info"}
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    yield node.args[0].value, node


def declared_labels() -> dict[str, set[str]]:
    """Label names of each metric the packages declare (``Counter("name", "doc", ["a", "b"])``)."""
    declared: dict[str, set[str]] = {}
    for name, call in metric_constructors(METRIC_PACKAGES):
        names = call.args[2] if len(call.args) > 2 else next(
            (k.value for k in call.keywords if k.arg == "labelnames"), None)  # fmt: skip
        if isinstance(names, ast.List | ast.Tuple):
            declared.setdefault(name, set()).update(
                e.value for e in names.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)
            )
    return declared


def scraped_labels(text: str) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({series name: label names}, {bucket series name: its ``le`` values}) of a scrape of ``text``."""
    from prometheus_client.parser import text_string_to_metric_families

    labels: dict[str, set[str]] = {}
    buckets: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels.setdefault(s.name, set()).update(s.labels)
            if "le" in s.labels:
                buckets.setdefault(s.name, set()).add(s.labels["le"])
    return labels, buckets


def label_gaps(exprs: list[str], scrape: str) -> list[str]:
    """Labels the expressions use that their metric does not carry (scraped, declared, from the target
    or the Pushgateway group), and ``le`` values that are no bucket bound of the scrape."""
    scraped, buckets = scraped_labels(scrape)
    declared = declared_labels()
    relabeled = {r["targetLabel"] for e in yaml.safe_load(PODMONITOR.read_text())["spec"]["podMetricsEndpoints"]
                 for r in e.get("relabelings", [])}  # fmt: skip
    gaps = []
    for expr in exprs:
        for metric, label, value in label_uses(expr):
            allowed = TARGET_LABELS | relabeled | scraped.get(metric, set())
            allowed |= declared.get(family(metric, set(declared)), set())
            allowed |= {"le"} if metric.endswith("_bucket") else set()
            allowed |= DRIFT_GROUPING if metric.startswith("motlens_drift_") else set()
            if label not in allowed:
                gaps.append(f"{metric} has no label {label!r} (it has {sorted(allowed)}): {expr}")
            elif label == "le" and value is not None and metric in buckets and value not in buckets[metric]:
                gaps.append(f"{metric} has no bucket le={value!r} (it has {sorted(buckets[metric])}): {expr}")
    return gaps


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


def test_namespace_variable_lists_predictors_without_a_model(tmp_path: Path) -> None:
    """``$namespace`` reads a series every predictor exports from its start, a model loaded or not:
    motlens_model_info is empty exactly while no pod can serve (a not-ready incident)."""
    (var,) = [v for v in json.loads(DASHBOARD.read_text())["templating"]["list"] if v["name"] == "namespace"]
    found = re.fullmatch(r"label_values\((\w+), namespace\)", var["query"]["query"])
    assert found and var["definition"] == var["query"]["query"], var
    script = (  # a fresh process: what PredictorServer.__init__ exports before any load (none succeeds)
        "from prometheus_client import REGISTRY\n"
        "from predictor.cache import EmbeddingCache\n"
        "from predictor.settings import ServeSettings\n"
        "from predictor.slots import SlotManager\n"
        "def refuse(ref, lkg=True):\n"
        "    raise RuntimeError('no model')\n"
        "SlotManager(ServeSettings(), EmbeddingCache(0), refuse)\n"
        "print(sorted({s.name for m in REGISTRY.collect() for s in m.samples}))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, env={**os.environ, "MOTLENS_HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert f"'{found.group(1)}'" in out.stdout.splitlines()[-1]


def test_dashboard_shows_the_share_of_cancelled_requests() -> None:
    """MotlensRequestsCancelledHigh's quantity (requests whose client gave up, over all requests) is
    on the dashboard as a share, not only as a rate among the other failed outcomes."""
    shares = [e for e in dashboard_exprs(dashboard())
              if ("motlens_requests_total", "outcome", "cancelled") in label_uses(e) and " / " in e]  # fmt: skip
    assert shares


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


def _unit(panel: dict[str, Any], target: dict[str, Any]) -> str | None:
    """The unit Grafana shows ``target`` in: an override naming its legend or query, else the default."""
    unit = panel["fieldConfig"]["defaults"].get("unit")
    mine = {("byName", target["legendFormat"]), ("byFrameRefID", target["refId"])}
    for o in panel["fieldConfig"]["overrides"]:
        if (o["matcher"]["id"], o["matcher"]["options"]) in mine:
            unit = next((p["value"] for p in o["properties"] if p["id"] == "unit"), unit)
    return unit


def test_seconds_and_bytes_are_plotted_in_their_units() -> None:
    """A quantile of a ``*_seconds`` histogram is drawn in seconds and a ``*_bytes`` series in bytes,
    also when a panel mixes both (each on its own axis)."""
    wrong = []
    for panel in panels(dashboard()):
        for target in panel["targets"]:
            names = METRIC.findall(target["expr"])
            if "histogram_quantile" in target["expr"] and all(n.endswith("_seconds_bucket") for n in names):
                want = "s"
            elif names and all(n.endswith("_bytes") for n in names):
                want = "bytes"
            else:
                continue
            if _unit(panel, target) != want:
                wrong.append(f"{panel['title']} / {target['legendFormat']}: {_unit(panel, target)}, not {want}")
    assert not wrong


SCRAPE = """# TYPE motlens_requests_total counter
motlens_requests_total{protocol="v2",outcome="ok",version="3"} 3.0
# TYPE motlens_request_latency_seconds histogram
motlens_request_latency_seconds_bucket{protocol="v2",version="3",le="0.1"} 3.0
motlens_request_latency_seconds_bucket{protocol="v2",version="3",le="+Inf"} 3.0
motlens_request_latency_seconds_count{protocol="v2",version="3"} 3.0
motlens_request_latency_seconds_sum{protocol="v2",version="3"} 0.1
"""


def test_label_check_catches_labels_a_metric_does_not_have() -> None:
    ok = [
        'sum by (namespace, outcome) (rate(motlens_requests_total{outcome="ok", revision=~".+"}[5m]))',
        'sum by (le) (rate(motlens_request_latency_seconds_bucket{le="0.1"}[5m]))',
        "sum by (reason) (rate(motlens_rejected_total[5m]))",  # declared in predictor/metrics.py, not yet counted
        'max by (slot) (motlens_drift_last_run_timestamp_seconds{slot="canary"})',  # the Pushgateway group's
        'label_replace(max by (version) (motlens_model_info), "model_version", "$1", "version", "(.+)")',
        'max by (model_version) (label_replace(max by (version) (motlens_model_info), "model_version", "$1", '
        '"version", "(.+)"))',
        "label_values(motlens_model_info, namespace)",
    ]
    assert label_gaps(ok, SCRAPE) == []
    bad = [
        'sum(rate(motlens_requests_total{status="ok"}[5m]))',  # /tmp/audit-obs/labelgap.py
        "sum by (status) (rate(motlens_requests_total[5m]))",
        "max without (model_version) (motlens_model_info)",
        'sum(rate(motlens_request_latency_seconds_bucket{le="0.2"}[5m]))',
        "label_values(motlens_model_info, model)",
    ]
    gaps = label_gaps(bad, SCRAPE)
    assert len(gaps) == len(bad), gaps
    assert all(expr in gap for expr, gap in zip(bad, gaps, strict=True))


# ------------------------------------------------------------------------------------------------
# The cross-check against real code.


def job_metric_names() -> set[str]:
    """Metric names the drift and promotion packages define (prometheus_client constructors)."""
    return {name for name, _ in metric_constructors(JOB_PACKAGES)}


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
    gaps = label_gaps(dashboard_exprs(dashboard()) + rule_exprs(), scraped.text)
    assert not gaps, "\n".join(gaps)


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
