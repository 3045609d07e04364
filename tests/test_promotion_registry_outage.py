"""The promotion CLI with MLflow down (a real closed port) and after it: ``status`` shows what it could
read and names what it could not (it printed only "registry unreachable"), and an interrupted change
that any later run replaces, with or without --force, keeps its row in the trail (a non-force run
overwrote it silently), saying so when the server's alias follower had already reverted it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from promotion_support import local_rollout

import predlog
from motlens.cli import main
from predictor.events import follow_row
from promotion.audit import tag_version
from promotion.local_target import LocalTarget
from promotion.status import read_status, registry_problem
from promotion.tags import INTENT_TAG
from promotion.workflow import PartlyDone, Promoter, PromotionError, Refused
from training.registry import Registry, RegistryUnreachable

#: MLflow on a port nothing listens on, with credentials in its URI (never printed)
DOWN = "http://adm:SECRET@127.0.0.1:1"
GRACE_S = 300.0
_ADMIN_API = LocalTarget._request  # the real one: an HTTP request to the server's admin API


class Killed(BaseException):
    """What SIGKILL leaves (no ``except Exception`` runs): the process stops where it is."""


@pytest.fixture
def local(registry, tiny_bundle, tmp_path, monkeypatch):
    """v2 in production on a local server (it replaced v1), v3 canary at 10 %."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a closed port fails at once
    env, serve, settings, target = local_rollout(registry, tiny_bundle.root, tmp_path, monkeypatch)
    Promoter(settings, env.registry, target, force=True).canary_start("3", 10)
    return env, serve, settings, target


def _killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
    raise Killed


def _rows() -> list[dict]:
    return predlog.open_reader().promotion_events(limit=100).to_dict("records")


def _intents(env) -> list[str]:
    return [k for k in env.registry.model_tags() if k.startswith(INTENT_TAG)]


def test_status_with_the_registry_down_prints_what_it_read_and_exits_2(local, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DOWN)
    monkeypatch.setenv("COLUMNS", "250")
    argv = ["promote", "status", "--target", "local", "--local-url", "http://127.0.0.1:1"]
    assert main([*argv, "--json"]) == 2
    out, err = capsys.readouterr()
    status = json.loads(out)
    assert status["live"]["production_version"] == "2" and status["live"]["canary_version"] == "3"
    assert [e["action"] for e in status["events"]][:2] == ["canary_start", "promote"]  # the trail was read
    assert status["aliases"] is None and status["versions"] is None  # unknown, not "none set"
    assert status["registry_error"].startswith("unreachable (http://127.0.0.1:1): "), status["registry_error"]
    assert "registry: unreachable (http://127.0.0.1:1)" in err
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "production v2 at 90%, canary v3 at 10%" in out and "canary_start 2→3" in out, out
    assert "unreachable (http://127.0.0.1:1)" in out and "registry: unreachable (http://127.0.0.1:1)" in err
    assert "SECRET" not in out + err and "adm:" not in out + err


def test_status_with_the_registry_and_the_server_down_names_both(local, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DOWN)
    monkeypatch.setattr(LocalTarget, "_request", _ADMIN_API)  # nothing listens on the local URL either
    assert main(["promote", "status", "--target", "local", "--local-url", "http://127.0.0.1:1", "--json"]) == 2
    out, err = capsys.readouterr()
    status = json.loads(out)
    assert status["live"] is None and status["registry_error"].startswith("unreachable (")
    assert "live state unreadable" in err and "registry: unreachable (http://127.0.0.1:1)" in err


def _killed_then_set_by_hand(env, serve, settings, target, monkeypatch) -> None:
    """A `canary set 25` killed after the server took it, then the share set to 40 by hand on the server."""
    monkeypatch.setattr("promotion.workflow.tag_version", _killed)
    with pytest.raises(Killed):
        Promoter(settings, env.registry, target).canary_set(25, reason="killed step")
    monkeypatch.setattr("promotion.workflow.tag_version", tag_version)
    serve.percent = 40.0


def _abandoned(rows: list[dict]) -> list[dict]:
    return [r for r in rows if json.loads(r["details"]).get("abandoned")]


def test_a_non_force_run_replacing_a_changed_intent_records_it_as_abandoned(local, monkeypatch):
    """A killed step whose share was then edited by hand: the versions still agree, so the guard lets
    the next plain command through, and its intent replaced the killed one's without a row."""
    env, serve, settings, target = local
    _killed_then_set_by_hand(env, serve, settings, target, monkeypatch)
    assert read_status(Promoter(settings, env.registry, target))["interrupted"]["next"] == "changed"
    out = Promoter(settings, env.registry, target).canary_set(60, reason="next step")
    assert out.action == "canary_set" and target.read().percent == 60 and out.audit_ok, out.message
    rows = _rows()
    (abandoned,) = _abandoned(rows)
    assert abandoned["action"] == "canary_set" and not abandoned["success"] and "killed step" in abandoned["reason"]
    said = f"recorded as abandoned when canary_set 2→3 of {settings.who} began"
    assert said in abandoned["reason"] and "replaced by" not in abandoned["reason"], abandoned["reason"]
    assert "--force" not in abandoned["reason"]
    assert rows[0]["action"] == "canary_set" and "next step" in rows[0]["reason"] and rows[0]["success"]
    assert not _intents(env)


def _promote_with_mlflow_going_down(env, serve, settings, target, monkeypatch) -> None:
    """v3 at 100 %, promoted on the server; MLflow goes down as the server answers, so neither the alias
    nor the version tags follow and the intent stays."""
    Promoter(settings, env.registry, target, force=True).canary_set(100)
    p = Promoter(settings, env.registry, target, force=True)  # no traffic logged here: past the live gate

    def request(self, method, path, body=None):  # noqa: ANN001, ANN202
        answer = serve.request(method, path, body)
        if path.endswith("/promote"):
            p.registry = Registry(DOWN, state=env.registry.state)
        return answer

    monkeypatch.setattr(LocalTarget, "_request", request)
    with pytest.raises(PartlyDone):
        p.promote(reason="release 3")
    monkeypatch.setattr(LocalTarget, "_request", lambda self, m, path, body=None: serve.request(m, path, body))
    assert env.registry.aliases() == {"production": "2", "canary": "3"} and _intents(env)


def _follower_reverts(serve) -> None:
    """What `motlens serve --follow-alias production` does once the registry answers again after the
    admin API's grace: production back to the version the alias still names, and its row."""
    serve.slots["production"] = {"version": "2", "ref": "models:/mot-defects/2"}
    row = follow_row("production", "3", "2", datetime.now(UTC), "models:/mot-defects/2", percent=0.0,
                     reverted_after_s=GRACE_S)  # fmt: skip
    predlog.open_reader().insert_promotion_event(row)


@pytest.mark.parametrize("then", ["canary_start", "rollback"])  # what the refusal offers
def test_a_promote_the_follower_reverted_is_said_plainly_and_recorded_when_replaced(local, monkeypatch, then):
    env, serve, settings, target = local
    _promote_with_mlflow_going_down(env, serve, settings, target, monkeypatch)
    _follower_reverts(serve)
    shown = read_status(Promoter(settings, env.registry, target))["interrupted"]
    assert shown["action"] == "promote" and shown["next"] == "changed", shown
    assert "follower reverted it" in shown["reverted"] and "version 2 serves production again" in shown["reverted"]
    with pytest.raises(Refused) as refused:
        Promoter(settings, env.registry, target).promote()
    said = str(refused.value)
    assert "the server's alias follower reverted the interrupted promote (production v2" in said, said
    assert f"within the admin API's grace ({GRACE_S:.0f} s)" in said and "version 2 serves production again" in said
    assert "motlens promote canary start 3" in said and "`motlens promote rollback`" in said, said
    assert serve.slots["production"]["version"] == "2" and _intents(env)  # refused: nothing replaced
    p = Promoter(settings, env.registry, target)
    out = p.canary_start("3", 10, reason="again") if then == "canary_start" else p.rollback(reason="not now")
    assert out.action == then and "is recorded as abandoned: the server's alias follower" in out.message, out.message
    assert serve.slots["canary"]["version"] == ("3" if then == "canary_start" else None)
    assert serve.slots["production"]["version"] == "2" and env.registry.aliases()["production"] == "2"
    (abandoned,) = [r for r in _rows() if json.loads(r["details"]).get("abandoned")]
    assert abandoned["action"] == "promote" and "release 3" in abandoned["reason"], abandoned
    assert "follower reverted it" in abandoned["reason"], abandoned["reason"]
    assert f"recorded as abandoned when {then} " in abandoned["reason"], abandoned["reason"]
    assert not _intents(env)


@pytest.mark.parametrize("failing", [("set_model_tag",), ("set_model_tag", "delete_model_tag")])
def test_an_abandoned_row_stays_true_and_single_when_the_run_recording_it_fails(local, monkeypatch, failing):
    """The registry stops taking writes after the run read the interrupted change: its row was written
    first, saying the change was "replaced by" a run that then changed nothing, and the retry (the intent
    still there when its removal failed too) wrote a second one."""
    env, serve, settings, target = local
    _killed_then_set_by_hand(env, serve, settings, target, monkeypatch)

    def down(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RegistryUnreachable("model registry http://127.0.0.1:1 unreachable or failing: gone")

    with monkeypatch.context() as m:
        for name in failing:
            m.setattr(Registry, name, down)
        with pytest.raises(PromotionError) as failed:
            Promoter(settings, env.registry, target).canary_set(60, reason="next step")
    assert "nothing was changed" in str(failed.value) and "is recorded as abandoned" in str(failed.value)
    assert target.read().percent == 40
    (abandoned,) = _abandoned(_rows())
    assert f"recorded as abandoned when canary_set 2→3 of {settings.who} began" in abandoned["reason"]
    assert "replaced" not in abandoned["reason"], abandoned["reason"]
    assert json.loads(abandoned["details"])["recorded_by"] == {"action": "canary_set", "actor": settings.who}
    out = Promoter(settings, env.registry, target).canary_set(60, reason="next step again")
    assert out.action == "canary_set" and target.read().percent == 60 and out.audit_ok, out.message
    assert ("recorded as abandoned by an earlier run" in out.message) == ("delete_model_tag" in failing), out.message
    assert len(_abandoned(_rows())) == 1
    assert not _intents(env)


def test_a_follower_revert_is_not_named_once_production_changed_again(local, monkeypatch):
    """The follower reverted the promote to v2, then v1 was installed by hand: "version 2 serves
    production again" is no longer true, so neither status nor the refusal says it."""
    env, serve, settings, target = local
    _promote_with_mlflow_going_down(env, serve, settings, target, monkeypatch)
    _follower_reverts(serve)
    serve.slots["production"] = {"version": "1", "ref": "models:/mot-defects/1"}
    shown = read_status(Promoter(settings, env.registry, target))["interrupted"]
    assert shown["next"] == "changed" and "reverted" not in shown, shown
    with pytest.raises(Refused) as refused:
        Promoter(settings, env.registry, target).promote()
    assert "follower reverted" not in str(refused.value) and "serves production again" not in str(refused.value)


def test_a_follow_row_not_of_a_server_is_no_follower_revert(local, monkeypatch):
    env, serve, settings, target = local
    _promote_with_mlflow_going_down(env, serve, settings, target, monkeypatch)
    serve.slots["production"] = {"version": "2", "ref": "models:/mot-defects/2"}
    row = follow_row("production", "3", "2", datetime.now(UTC), "models:/mot-defects/2", percent=0.0,
                     reverted_after_s=GRACE_S)  # fmt: skip
    predlog.open_reader().insert_promotion_event({**row, "target": "local"})
    assert "reverted" not in read_status(Promoter(settings, env.registry, target))["interrupted"]


def test_status_when_a_later_registry_read_fails_prints_what_it_read(local, capsys, monkeypatch):
    """The aliases, versions and model tags answer, then a version's read fails: status printed nothing."""

    def down(self, ref):  # noqa: ANN001, ANN202
        raise RegistryUnreachable("model registry http://127.0.0.1:1 unreachable or failing: gone")

    monkeypatch.setattr(Registry, "resolve", down)
    monkeypatch.setenv("COLUMNS", "250")
    argv = ["promote", "status", "--target", "local", "--local-url", "http://127.0.0.1:1"]
    assert main([*argv, "--json"]) == 2
    out, err = capsys.readouterr()
    status = json.loads(out)
    assert status["aliases"] == {"production": "2", "canary": "3"} and status["versions"], status
    assert status["live"]["production_version"] == "2" and status["events"]
    assert status["registry_error"].startswith("unreachable ("), status["registry_error"]
    assert "tag_disagreements" not in status and "disagreements" not in status  # unknown, not "agree"
    assert "motlens promote: registry: unreachable (" in err
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "canary → v3, production → v2" in out and "gone" in out, out
    assert "live vs registry and any interrupted change unknown" in out, out


def test_the_registry_problem_keeps_its_wording_around_a_redacted_uri():
    uri = "http://adm:SECRET@127.0.0.1:5000/?token=TOKVAL"
    promoter = SimpleNamespace(registry=SimpleNamespace(tracking_uri=uri))
    said = registry_problem(promoter, RegistryUnreachable(f"model registry {uri} unreachable or failing: gone"))  # type: ignore[arg-type]
    assert said == (
        "unreachable (http://127.0.0.1:5000/?token=***): model registry http://127.0.0.1:5000/?token=*** "
        "unreachable or failing: gone"
    ), said


def test_a_row_recorded_during_the_outage_without_a_metrics_target_is_a_complete_audit(local, caplog):
    """With no Pushgateway or textfile set there is nothing to export: recording a row read the aliases
    for the metrics anyway, so during an outage it logged "could not export promotion metrics" and called
    an audit whose row was stored incomplete."""
    env, serve, settings, target = local
    assert not settings.pushgateway_url and not settings.textfile
    p = Promoter(settings, env.registry, target)
    p.registry = Registry(DOWN, state=env.registry.state)
    event = p._event("canary_set", from_version="2", to_version="3", reason="recorded in the outage")
    event.success = False
    assert p._record(event, {})
    assert "could not export" not in caplog.text
    assert _rows()[0]["reason"] == "recorded in the outage"
