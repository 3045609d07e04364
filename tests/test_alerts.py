"""The PrometheusRule: `promtool check rules`, and `promtool test rules` unit tests for every alert."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from manifest_helpers import MANIFESTS, promtool

RULE_FILE = MANIFESTS / "monitoring" / "prometheusrule.yaml"
UNIT_TESTS = MANIFESTS / "monitoring" / "tests" / "alerts.test.yaml"
# What the alerts must cover (issue: deployment and monitoring) → the alert that does it.
REQUIRED = {
    "p99 latency": "MotlensP99LatencyHigh",
    "p99 < 100 ms target (latency SLO)": "MotlensLatencySloBreach",
    "error rate": "MotlensErrorRateHigh",
    "cancelled requests (clients giving up)": "MotlensRequestsCancelledHigh",
    "drift detected": "MotlensDriftDetected",
    "drift job stale, per slot": "MotlensDriftJobStale",
    "drift job failing, per slot": "MotlensDriftJobFailing",
    "drift job never reported": "MotlensDriftJobNeverReported",
    "promotion job stale": "MotlensPromotionJobStale",
    "promotion job never reported": "MotlensPromotionJobNeverReported",
    "prediction log spilling": "MotlensPredlogSpilling",
    "prediction log dropping": "MotlensPredlogDropping",
    "prediction log rows held for another sink": "MotlensPredlogHeld",
    "GPU memory near limit": "MotlensGpuMemoryNearLimit",
    "canary receiving no traffic": "MotlensCanaryNoTraffic",
    "served version != registry alias": "MotlensServedVersionMismatch",
}


def rule_groups(text: str | None = None) -> dict[str, Any]:
    """The PrometheusRule's spec: a plain Prometheus rule file."""
    rule = yaml.safe_load(text if text is not None else RULE_FILE.read_text())
    assert rule["kind"] == "PrometheusRule" and rule["apiVersion"] == "monitoring.coreos.com/v1"
    return rule["spec"]


def alerts() -> list[dict[str, Any]]:
    return [r for g in rule_groups()["groups"] for r in g["rules"] if "alert" in r]


def run_unit_tests(directory: Path, rules: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    (directory / "rules.yaml").write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(UNIT_TESTS, directory / "alerts.test.yaml")
    return subprocess.run([promtool(), "test", "rules", "alerts.test.yaml"], cwd=directory,
                          capture_output=True, text=True, timeout=120)


def test_required_alerts_exist_with_severity_and_text() -> None:
    by_name = {a["alert"]: a for a in alerts()}
    missing = {need: name for need, name in REQUIRED.items() if name not in by_name}
    assert not missing
    for alert in by_name.values():
        assert alert["labels"]["severity"] in {"warning", "critical"}, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"], alert["alert"]


def test_every_alert_is_explained_in_deploy_docs() -> None:
    text = (MANIFESTS.parent / "docs" / "deploy.md").read_text()
    assert not [a["alert"] for a in alerts() if a["alert"] not in text]


def test_promtool_check_rules(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups(), sort_keys=False))
    out = subprocess.run([promtool(), "check", "rules", str(tmp_path / "rules.yaml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups()['groups'])} rules found" in out.stdout


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    out = run_unit_tests(tmp_path, rule_groups())
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    cases = [c for t in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    for name in (a["alert"] for a in alerts()):
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test where it stays quiet"


@pytest.mark.parametrize(
    ("alert", "old", "new"),
    [
        ("MotlensErrorRateHigh", "> 0.01", "> 0.5"),
        ("MotlensRequestsCancelledHigh", "> 0.05", "> 0.5"),
        # client errors (or any other failure) counted as cancellations
        ("MotlensRequestsCancelledHigh", 'outcome="cancelled"', 'outcome!="ok"'),
        # one namespace's cancellations diluted by the others' traffic
        ("MotlensRequestsCancelledHigh", "sum by (namespace) (", "sum("),
        ("MotlensCanaryNoTraffic", "max(motlens_canary_percent) > 0", "max(motlens_canary_percent) > 50"),
        ("MotlensLatencySloBreach", "> 0.01", "> 0.1"),
        # one slot's runs would hide the other's failures again
        ("MotlensDriftJobFailing", "max by (slot) (", "max("),
        ("MotlensDriftJobStale", 'timestamp_seconds{slot!="canary"}', "timestamp_seconds"),
        # per reason: a retried model's alternating reason restarts `for:` at every retry, never fires
        ("MotlensModelNotReady", "max by (namespace, pod) (", "max by (namespace, pod, reason) ("),
        # a canary verdict counted while its version is served, not only while it is the canary
        ("MotlensDriftDetected", 'motlens_registry_alias_info{alias="canary"}', "motlens_model_info"),
    ],
)
def test_unit_tests_catch_a_broken_rule(tmp_path: Path, alert: str, old: str, new: str) -> None:
    text = RULE_FILE.read_text()
    start = text.index(f"- alert: {alert}\n")
    end = text.find("- alert: ", start + 1) % (len(text) + 1)
    assert old in text[start:end]
    broken = rule_groups(text[:start] + text[start:end].replace(old, new) + text[end:])
    out = run_unit_tests(tmp_path, broken)
    assert out.returncode != 0
    assert alert in out.stdout + out.stderr
