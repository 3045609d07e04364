"""`auto` with step/start times the registry does not hold as this version writes them: tags missing
(an earlier writer, a hand edit), a time in the future (another host's clock runs ahead), a time
without a zone. The live gate's window must come from what the audit trail recorded, a skewed clock
must be named, and a naive time read as UTC."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest
from promotion_support import HEALTHY, drift_report, log_traffic, make_env

from promotion.tags import STARTED_AT_TAG, STEP_AT_TAG
from promotion.targets import GitOpsTarget
from promotion.workflow import Promoter

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@pytest.fixture
def canary(registry, tiny_bundle, tmp_path, monkeypatch):
    """Production v1 on the GitOps overlay, v2 started as its canary at 10 % by `auto`."""
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.61])
    target = GitOpsTarget(env.settings())
    Promoter(env.settings(golden_check=False), registry, target, force=True).promote("1")
    registry.set_alias("candidate", "2")
    out = Promoter(env.settings(golden_check=False), registry, target).auto()
    assert out.action == "canary_start", out.message
    return env, target


def _auto(env, target, reader_factory=None, **kw):
    return Promoter(env.settings(golden_check=False, **kw), env.registry, target,
                    reader_factory=reader_factory).auto()


def _evidence():
    log_traffic("2", "canary", HEALTHY)
    log_traffic("1", "production", HEALTHY)
    drift_report("2", detected=False)


def _delete_tags(env, version, names):
    client = env.registry.client
    for name in names:
        client.delete_model_version_tag("mot-defects", version, name)


class NoEvents:
    """The real log, without the promotion_events rows (an earlier version wrote none)."""

    def __init__(self):
        import predlog

        self.real = predlog.open_reader()

    def promotion_events(self, **kw):
        return pd.DataFrame()

    def __getattr__(self, name):
        return getattr(self.real, name)


def _live(out):
    return next(r for r in out.gates if r.name == "live")


def test_missing_step_tags_fall_back_to_the_audit_trails_canary_start(canary):
    env, target = canary
    _delete_tags(env, "2", [STEP_AT_TAG, STARTED_AT_TAG])
    _evidence()
    out = _auto(env, target)
    assert out.action == "advance", out.message
    assert "audit trail" in _live(out).detail and "canary_start" in _live(out).detail


def test_missing_tags_and_history_use_the_promotion_events_table(canary):
    env, target = canary
    tags = env.registry.resolve("2").tags
    _delete_tags(env, "2", [STEP_AT_TAG, STARTED_AT_TAG] + [t for t in tags if t.startswith("promotion.event.")])
    _evidence()
    out = _auto(env, target)
    assert out.action == "advance", out.message
    assert "promotion_events" in _live(out).detail


def test_nothing_recorded_uses_a_bounded_lookback_and_says_so(canary):
    env, target = canary
    tags = env.registry.resolve("2").tags
    _delete_tags(env, "2", [STEP_AT_TAG, STARTED_AT_TAG] + [t for t in tags if t.startswith("promotion.event.")])
    _evidence()
    out = _auto(env, target, reader_factory=NoEvents)
    assert out.action == "advance", out.message
    assert "no step time recorded" in _live(out).detail and "last 1 h" in _live(out).detail


def test_no_recorded_start_never_counts_a_drift_report_older_than_the_window(canary):
    """With no start recorded anywhere, the drift gate counted every report ever written for the version:
    a month-old 'no drift' passed it."""
    env, target = canary
    tags = env.registry.resolve("2").tags
    _delete_tags(env, "2", [STEP_AT_TAG, STARTED_AT_TAG] + [t for t in tags if t.startswith("promotion.event.")])
    log_traffic("2", "canary", HEALTHY)
    log_traffic("1", "production", HEALTHY)
    drift_report("2", detected=False, at=datetime.now(UTC) - timedelta(days=30))
    out = _auto(env, target, reader_factory=NoEvents)
    drift = next(r for r in out.gates if r.name == "drift")
    assert out.action == "hold" and drift.status == "wait", (out.message, drift)
    assert "no start of version 2 recorded" in drift.detail
    drift_report("2", detected=False)  # a report of this window passes it
    assert _auto(env, target, reader_factory=NoEvents).action == "advance"


def test_a_step_time_in_the_future_is_held_as_clock_skew(canary):
    env, target = canary
    future = datetime.now(UTC) + timedelta(hours=2)
    env.registry.set_tags("2", {STEP_AT_TAG: future.isoformat()})
    _evidence()
    out = _auto(env, target, min_step_interval_s=600)
    assert out.action == "hold"
    assert "clock" in out.message and future.isoformat() in out.message and "later than now" in out.message
    # the remedy the message names: `canary set` at the current share re-stamps the step with this clock
    Promoter(env.settings(golden_check=False), env.registry, target).canary_set(10)
    restamped = datetime.fromisoformat(env.registry.resolve("2").tags[STEP_AT_TAG])
    assert abs((restamped - datetime.now(UTC)).total_seconds()) < 60
    assert "clock" not in _auto(env, target, min_step_interval_s=600).message


def test_a_start_time_in_the_future_is_held_as_clock_skew(canary):
    env, target = canary
    future = datetime.now(UTC) + timedelta(hours=2)
    env.registry.set_tags("2", {STARTED_AT_TAG: future.isoformat()})
    _evidence()
    out = _auto(env, target)
    drift = next(r for r in out.gates if r.name == "drift")
    assert out.action == "hold" and drift.status == "wait" and "clock" in drift.detail, out.message


def test_a_naive_step_time_is_read_as_utc(canary):
    env, target = canary
    naive = (datetime.now(UTC) - timedelta(hours=2)).replace(tzinfo=None)
    env.registry.set_tags("2", {STEP_AT_TAG: naive.isoformat(), STARTED_AT_TAG: naive.isoformat()})
    _evidence()
    out = _auto(env, target, min_step_interval_s=600)
    assert out.action == "advance", out.message
    naive_recent = datetime.now(UTC).replace(tzinfo=None).isoformat()
    env.registry.set_tags("2", {STEP_AT_TAG: naive_recent})
    _evidence()
    out = _auto(env, target, min_step_interval_s=600)
    assert out.action == "hold" and "dwell" in out.message, out.message


def test_a_canary_reloaded_after_its_step_is_judged_from_the_reload_on_both_sides(canary):
    """A restart restores the canary cold: its slow requests from before (another process, a busier box)
    against production's requests after the restart compared two times and rolled back a canary that
    was as fast as production (an end-to-end audit: p99 252 ms vs 39 ms, the same in the same minutes)."""
    import time

    import predlog
    from predictor.events import server_row

    env, target = canary
    env.registry.client.set_model_version_tag(
        "mot-defects", "2", STEP_AT_TAG, (datetime.now(UTC) - timedelta(minutes=20)).isoformat()
    )
    log_traffic("2", "canary", HEALTHY, latency_ms=250.0)  # before the restart: slow
    time.sleep(0.05)
    predlog.open_reader().insert_promotion_event(server_row(
        "serve_load", slot="canary", from_version=None, to_version="2", percent=10.0,
        reason="restored canary version 2", cause="restore",
    ))  # fmt: skip
    time.sleep(0.05)
    _evidence()  # after it: both as fast
    out = _auto(env, target)
    assert out.action == "advance", out.message
    assert "since the canary's reload at" in _live(out).detail
