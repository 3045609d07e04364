"""Where a verdict goes: the JSON summary, the ``drift_reports`` row, MLflow, Prometheus."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUMMARY_FILE = "summary.json"


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    path = out_dir / SUMMARY_FILE
    path.write_text(json.dumps(summary, indent=2, sort_keys=True))
    return path


def insert_row(reader: Any, summary: dict[str, Any]) -> None:
    """The summary as one ``drift_reports`` row: the same fields, ``details`` stored as JSON text."""
    reader.insert_drift_report(dict(summary))


def artifact_uri(client: Any, run_id: str, artifact_path: str) -> str:
    """Where ``artifact_path`` of the version's MLflow run lives (checks the run exists)."""
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


def metrics_registry(summary: dict[str, Any], now_s: float) -> Any:
    """The drift gauges (names as docs/architecture.md); ``detected`` only when there is a verdict."""
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()
    labels = {"model_version": summary["model_version"], "slot": summary["slot"]}
    if summary["details"]["status"] in ("drift", "no_drift"):
        Gauge("motlens_drift_detected", "1 when the last drift job found drift, else 0",
              ["model_version", "slot"], registry=reg).labels(**labels).set(int(summary["drift_detected"]))  # fmt: skip
    score = Gauge("motlens_drift_score", "drift scores of the last drift job (see docs/drift.md)",
                  ["model_version", "slot", "metric"], registry=reg)  # fmt: skip
    for metric, value in sorted(summary["scores"].items()):
        score.labels(**labels, metric=metric).set(value)
    if summary["details"]["status"] == "error":
        Gauge("motlens_drift_last_error_timestamp_seconds", "when a drift job last failed (no verdict)",
              registry=reg).set(now_s)  # fmt: skip
    else:
        Gauge("motlens_drift_last_run_timestamp_seconds", "when the drift job last finished with a verdict "
              "or with too little data", registry=reg).set(now_s)  # fmt: skip
    return reg


def push_metrics(
    reg: Any, *, pushgateway: str | None, textfile: Path | None, job: str, grouping: dict[str, str]
) -> list[str]:
    """Push to a Pushgateway and/or write a node-exporter textfile; returns where they went."""
    from prometheus_client import push_to_gateway, write_to_textfile

    went = []
    if pushgateway:
        push_to_gateway(pushgateway, job=job, registry=reg, grouping_key=grouping, timeout=10)
        went.append(pushgateway)
    if textfile:
        Path(textfile).parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(textfile), reg)
        went.append(str(textfile))
    return went
