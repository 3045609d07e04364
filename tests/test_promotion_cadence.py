"""`promote auto` on a schedule (the 10-minute timer or CronJob) with the local target: a step stamped
when it was applied, some seconds into its run, is due at the next run; a run while the server is
down, starting or loading its models holds (exit 0, a recorded hold) instead of failing or advising
--force, while a real disagreement is still refused."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from promotion_support import HEALTHY, FakeServe, drift_report, log_traffic, make_env

from motlens.cli import main
from promotion.local_target import LocalTarget
from promotion.settings import PromoteSettings
from promotion.tags import STARTED_AT_TAG, STEP_AT_TAG
from promotion.targets import TargetError
from promotion.workflow import Promoter, Refused

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the overlay copy")

_REQUEST = LocalTarget._request  # the real admin client


@pytest.fixture
def canary(registry, tiny_bundle, tmp_path, monkeypatch):
    """v1 in production on a local server, v2 its canary at 10 % (started by `auto`)."""
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.61])
    registry.set_alias("production", "1")
    registry.set_alias("candidate", "2")
    serve = FakeServe("1")
    monkeypatch.setattr(
        LocalTarget, "_request", lambda self, method, path, body=None: serve.request(method, path, body)
    )
    interval = PromoteSettings.model_fields["min_step_interval_s"].default  # the rest of the dwell as by default
    settings = env.settings(target="local", local_url="http://127.0.0.1:1", golden_check=False,
                            min_step_interval_s=interval)  # fmt: skip
    assert Promoter(settings, registry, LocalTarget(settings)).auto().action == "canary_start"
    return env, serve, settings


def _auto(env, settings):
    return Promoter(settings, env.registry, LocalTarget(settings)).auto()


def _stepped(env, seconds_ago: float) -> None:
    """The canary's step (and start) applied ``seconds_ago``, with healthy evidence since."""
    at = (datetime.now(UTC) - timedelta(seconds=seconds_ago)).isoformat()
    env.registry.set_tags("2", {STEP_AT_TAG: at, STARTED_AT_TAG: at})
    log_traffic("2", "canary", HEALTHY)
    log_traffic("1", "production", HEALTHY)
    drift_report("2", detected=False)


def _last_event() -> dict[str, Any]:
    import predlog

    return predlog.open_reader().promotion_events(limit=1).to_dict("records")[0]


def test_the_dwell_allows_for_the_time_a_run_takes_to_apply_its_step():
    fields = PromoteSettings.model_fields
    assert (fields["min_step_interval_s"].default, fields["step_tolerance_s"].default) == (600.0, 120.0)
    assert PromoteSettings(min_step_interval_s=600).dwell_s == 480
    assert PromoteSettings(min_step_interval_s=60).dwell_s == 30  # at most half the interval
    assert PromoteSettings(min_step_interval_s=600, step_tolerance_s=0).dwell_s == 600


def test_each_scheduled_run_steps_while_a_rerun_soon_after_holds(canary):
    """A step applied 35 s into the run at T (the golden check, the load), the next run at T + 600 s:
    it saw 565 s < 600 s and held, so every step took two 10-minute ticks (80 minutes, not 40)."""
    env, serve, settings = canary
    _stepped(env, 565)
    out = _auto(env, settings)
    assert out.action == "advance" and serve.percent == 25, out.message
    _stepped(env, 120)  # a manual run two minutes after that step
    out = _auto(env, settings)
    assert out.action == "hold" and "dwell 600s less 120s tolerance" in out.message, out.message
    assert serve.percent == 25


def test_auto_holds_while_the_server_is_down_and_the_unit_succeeds(canary, monkeypatch, capsys):
    """A tick while `motlens serve` was stopped failed the unit (exit 2, "Connection refused") and
    recorded nothing."""
    from conftest import free_port

    env, _, _ = canary
    monkeypatch.setattr(LocalTarget, "_request", _REQUEST)  # against a port nothing listens on
    monkeypatch.setenv("MOTLENS_PROMOTE_ACTOR", "systemd/motlens-promote@box")
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["promote", "auto", "--target", "local", "--local-url", url]) == 0
    assert "hold" in capsys.readouterr().out
    row = _last_event()
    assert (row["action"], row["actor"]) == ("hold", "systemd/motlens-promote@box")
    assert (row["from_version"], row["to_version"]) == ("1", "2")  # the rollout held, from the registry
    assert "cannot reach local motlens serve" in row["reason"] and "holding until it answers" in row["reason"]
    assert env.registry.aliases() == {"production": "1", "candidate": "2", "canary": "2"}


def test_a_starting_server_is_held_for_and_a_real_disagreement_still_refused(canary):
    """Listening but still loading its model after a restart, the server reads as production "(unknown)"
    and no canary: `auto` exited 3 advising --force, though nothing disagreed."""
    env, serve, settings = canary
    serve.slots = {"production": {"version": None, "ref": None, "loading": "models:/mot-defects@production"},
                   "canary": {"version": None, "ref": None}}  # fmt: skip
    serve.percent, serve.reason = 0.0, "loading models:/mot-defects@production"
    out = _auto(env, settings)
    assert out.action == "hold" and "not ready: loading models:/mot-defects@production" in out.message
    row = _last_event()
    assert row["action"] == "hold" and "not ready: loading models:/mot-defects@production" in row["reason"]
    p = Promoter(settings, env.registry, LocalTarget(settings))
    for verb in (p.advance, p.rollback, lambda: p.promote("2")):  # the manual verbs: retry, not --force
        with pytest.raises(TargetError, match="retry once it has finished") as e:
            verb()
        assert "--force" not in str(e.value)
    # production is back, the canary restore still loading: the registry must not move under it
    serve.slots["production"] = {"version": "1", "ref": "models:/mot-defects@production"}
    serve.slots["canary"] = {"version": None, "ref": None, "loading": "models:/mot-defects/2"}
    serve.reason = None
    out = _auto(env, settings)
    assert out.action == "hold" and "canary loading models:/mot-defects/2" in out.message, out.message
    with pytest.raises(TargetError, match="retry"):
        p.rollback()
    assert env.registry.aliases()["canary"] == "2" and env.registry.resolve("2").tags["promotion.status"] == "canary"
    # settled, but serving another production than the alias names: refused as before
    serve.slots["production"] = {"version": "2", "ref": "models:/mot-defects/2"}
    serve.slots["canary"] = {"version": None, "ref": None}
    with pytest.raises(Refused, match="re-run with --force"):
        _auto(env, settings)


def test_a_server_that_is_not_ready_is_named_and_retry_advised(canary):
    """Not ready without loading anything (stopping, or its model failed to load): the refusal names
    the server's reason and says to retry, --force only for a model that cannot load."""
    env, serve, settings = canary
    serve.slots = {"production": {"version": None, "ref": None}, "canary": {"version": None, "ref": None}}
    serve.percent, serve.reason = 0.0, "server is shutting down"
    assert "not ready: server is shutting down" in _auto(env, settings).message
    with pytest.raises(Refused) as e:
        Promoter(settings, env.registry, LocalTarget(settings)).rollback()
    assert "is not ready (server is shutting down)" in str(e.value) and "retry once it is ready" in str(e.value)
