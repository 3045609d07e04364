"""Where a verdict goes: the JSON summary, the ``drift_reports`` row, MLflow, Prometheus."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from motlens.atomic import atomic_write

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


def write_summary(out_dir: Path, summary: dict[str, Any]) -> Path:
    """Replace summary.json atomically: a failed write (a full disk) keeps the previous one whole."""
    path = out_dir / SUMMARY_FILE
    atomic_write(path, json.dumps(summary, indent=2, sort_keys=True))
    return path


def insert_row(reader: Any, summary: dict[str, Any]) -> None:
    """The summary as one ``drift_reports`` row: the same fields, ``details`` stored as JSON text."""
    reader.insert_drift_report(dict(summary))


def artifact_uri(client: Any, run_id: str, artifact_path: str) -> str:
    """Where ``artifact_path`` of the version's MLflow run lives (checks the run exists)."""
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


def metrics_registry(summary: dict[str, Any], now_s: float) -> Any:
    """The drift gauges (names as docs/architecture.md): the run's status and one of the two timestamps;
    ``detected`` and the scores only with a verdict, so a run without one leaves the last verdict's."""
    from prometheus_client import CollectorRegistry, Gauge

    reg = CollectorRegistry()
    labels = {"model_version": summary["model_version"], "slot": summary["slot"]}
    status = summary["details"]["status"]
    if status in ("drift", "no_drift"):
        Gauge("motlens_drift_detected", "1 when the last drift job with a verdict found drift, else 0",
              ["model_version", "slot"], registry=reg).labels(**labels).set(int(summary["drift_detected"]))  # fmt: skip
        score = Gauge("motlens_drift_score", "drift scores of the last drift job with a verdict (see docs/drift.md)",
                      ["model_version", "slot", "metric"], registry=reg)  # fmt: skip
        for metric, value in sorted(summary["scores"].items()):
            score.labels(**labels, metric=metric).set(value)
    Gauge("motlens_drift_last_status", "1 for the last drift job's status: drift, no_drift, insufficient_data, error",
          ["model_version", "slot", "status"], registry=reg).labels(**labels, status=status).set(1)  # fmt: skip
    if status == "error":
        Gauge("motlens_drift_last_error_timestamp_seconds", "when a drift job last failed (no verdict)",
              ["model_version", "slot"], registry=reg).labels(**labels).set(now_s)  # fmt: skip
    else:
        Gauge("motlens_drift_last_run_timestamp_seconds", "when the drift job last finished with a verdict or "
              "with too little data", ["model_version", "slot"], registry=reg).labels(**labels).set(now_s)  # fmt: skip
    return reg


def push_metrics(
    reg: Any, *, pushgateway: str | None, textfile: Path | None, job: str, grouping: dict[str, str]
) -> list[str]:
    """Push to a Pushgateway and/or write a node-exporter textfile; returns where they went.

    Both replace only the metric names ``reg`` holds (Pushgateway POST; the textfile keeps its other
    families), so a run without a verdict leaves the last verdict and the other timestamp in place."""
    from prometheus_client import pushadd_to_gateway, write_to_textfile

    went = []
    if pushgateway:
        pushadd_to_gateway(pushgateway, job=job, registry=reg, grouping_key=grouping, timeout=10)
        went.append(pushgateway)
    if textfile:
        path = Path(textfile)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_to_textfile(str(path), _with_previous(reg, path))  # a temporary file renamed: atomic
        went.append(str(path))
    return went


def _with_previous(reg: Any, path: Path) -> Any:
    """``reg``'s series plus those of the file at ``path`` this run does not replace — what a
    Pushgateway keeps: other slots' series, and this slot's series of the same model version in the
    families ``reg`` does not write (a new version's run drops the old version's series of its slot)."""
    from prometheus_client.parser import text_string_to_metric_families
    from prometheus_client.registry import Collector

    written = {f.name: f for f in reg.collect()}
    version, slot = next(
        ((s.labels["model_version"], s.labels["slot"]) for f in written.values() for s in f.samples), (None, None)
    )

    def kept(family: str, labels: dict[str, str]) -> bool:
        if labels.get("slot", slot) != slot:  # the other slot's series
            return True
        if family in written:
            return False
        if "slot" not in labels:  # not a drift series: another collector's metric in the same file
            return True
        # a run that never learnt its version (a failed resolve) replaces none of this slot's verdict
        return version == "" or labels.get("model_version") == version

    families = dict(written)
    try:
        previous = list(text_string_to_metric_families(path.read_text())) if path.is_file() else []
    except ValueError as e:  # a damaged file must not stop every later run from publishing
        log.warning("drift textfile %s could not be read (%s); rewriting it with this run's metrics", path, e)
        previous = []
    for f in previous:
        samples = [s for s in f.samples if kept(f.name, s.labels)]
        if not samples:
            continue
        if f.name in families:
            families[f.name].samples = samples + families[f.name].samples
        else:
            f.samples = samples
            families[f.name] = f

    class Families(Collector):
        def collect(self) -> list[Any]:
            return list(families.values())

    return Families()
