"""A promotion run that stops after the target changed but before the registry followed (killed, or its
audit failing): the next run finds the change's intent (written before the target changed) and finishes
it, instead of acting on a registry that says something else (review: a re-run of a killed canary
rollback rolled production back too; the next `auto` rolled the rejected canary out again; a re-run of
a killed promote retired nothing and lost what production replaced)."""

from __future__ import annotations

import json

import pytest
from promotion_support import local_rollout

import predlog
import promotion.workflow as wf
from promotion.audit import tag_version
from promotion.local_target import LocalTarget
from promotion.status import read_status
from promotion.tags import INTENT_TAG, PREVIOUS_TAG, STATUS_TAG
from promotion.workflow import PartlyDone, Promoter


class Killed(BaseException):
    """What SIGKILL leaves (no ``except Exception`` runs): the process stops where it is."""


@pytest.fixture
def local(registry, tiny_bundle, tmp_path, monkeypatch):
    """Production v1 promoted over by v2 (so v2 records v1 as what it replaced), v3 canary at 10 %."""
    env, serve, settings, target = local_rollout(registry, tiny_bundle.root, tmp_path, monkeypatch)
    env.registry.set_alias("candidate", "3")
    Promoter(settings, env.registry, target, force=True).canary_start("3", 10)
    return env, serve, settings, target


def _status(env, version: str) -> str | None:
    return env.registry.resolve(version).tags.get(STATUS_TAG)


def _intents(env) -> list[str]:
    return [k for k in env.registry.model_tags() if k.startswith(INTENT_TAG)]


def _killed_while_tagging(monkeypatch, run) -> None:
    def killed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise Killed

    monkeypatch.setattr(wf, "tag_version", killed)
    with pytest.raises(Killed):
        run()
    monkeypatch.setattr(wf, "tag_version", tag_version)


def test_a_rerun_of_a_killed_canary_rollback_finishes_it_and_does_nothing_more(local, monkeypatch):
    env, serve, settings, target = local
    _killed_while_tagging(monkeypatch, lambda: Promoter(settings, env.registry, target).rollback(reason="p99"))
    assert serve.slots["canary"]["version"] is None and "canary" not in env.registry.aliases()
    assert _status(env, "3") == "canary" and _intents(env)  # the registry did not follow; the intent says so
    shown = read_status(Promoter(settings, env.registry, target))["interrupted"]
    assert shown["action"] == "rollback" and "canary v3" in shown["from"] and shown["next"] == "finish", shown
    out = Promoter(settings, env.registry, target).rollback(reason="p99")
    assert out.action == "rollback" and "finished the interrupted rollback" in out.message, out.message
    assert serve.slots["production"]["version"] == "2"  # production was not rolled back to v1
    assert env.registry.aliases()["production"] == "2"
    assert _status(env, "3") == "rejected" and _status(env, "2") == "production"
    assert not _intents(env)
    rows = predlog.open_reader().promotion_events(limit=5)
    done = rows.iloc[0]
    assert (done["action"], bool(done["success"]), done["from_version"]) == ("rollback", True, "3")
    assert "finished by a later run" in done["reason"]
    assert not read_status(Promoter(settings, env.registry, target))["tag_disagreements"]


def test_auto_after_a_killed_canary_rollback_does_not_roll_it_out_again(local, monkeypatch):
    env, serve, settings, target = local
    _killed_while_tagging(monkeypatch, lambda: Promoter(settings, env.registry, target).rollback(reason="p99"))
    out = Promoter(settings, env.registry, target).auto()
    assert "finished the interrupted rollback" in out.message, out.message
    assert serve.slots["canary"]["version"] is None and _status(env, "3") == "rejected"
    out = Promoter(settings, env.registry, target).auto()  # the next tick: v3 stays rejected
    assert out.action == "hold" and serve.slots["canary"]["version"] is None, out.message


def test_auto_after_a_rollback_whose_tags_failed_writes_them_instead_of_a_new_canary(local, monkeypatch):
    env, serve, settings, target = local

    def unavailable(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise RuntimeError("MLflow: 503 Service Unavailable")

    monkeypatch.setattr(wf, "tag_version", unavailable)
    out = Promoter(settings, env.registry, target).rollback(reason="p99")
    assert not out.audit_ok and _status(env, "3") == "canary" and _intents(env)
    monkeypatch.setattr(wf, "tag_version", tag_version)
    out = Promoter(settings, env.registry, target).auto()
    assert "finished the interrupted rollback" in out.message and out.audit_ok, out.message
    assert serve.slots["canary"]["version"] is None and _status(env, "3") == "rejected"
    assert not _intents(env)


@pytest.mark.parametrize("stop", ["between_the_aliases", "before_the_audit"])
def test_a_rerun_of_a_killed_promote_retires_what_it_replaced(local, monkeypatch, stop):
    env, serve, settings, target = local
    Promoter(settings, env.registry, target, force=True).canary_set(100)
    if stop == "between_the_aliases":
        real = type(env.registry).delete_alias

        def killed(self, alias):  # noqa: ANN001, ANN202
            raise Killed

        monkeypatch.setattr(type(env.registry), "delete_alias", killed)
        with pytest.raises(Killed):
            Promoter(settings, env.registry, target, force=True).promote()
        monkeypatch.setattr(type(env.registry), "delete_alias", real)
        assert env.registry.aliases()["canary"] == "3" == env.registry.aliases()["production"]
    else:
        _killed_while_tagging(monkeypatch, lambda: Promoter(settings, env.registry, target, force=True).promote())
    out = Promoter(settings, env.registry, target).promote()
    assert "finished the interrupted promote" in out.message, out.message
    assert env.registry.aliases().get("production") == "3" and "canary" not in env.registry.aliases()
    assert _status(env, "3") == "production" and _status(env, "2") == "retired"
    assert env.registry.resolve("3").tags[PREVIOUS_TAG] == "2"  # a production rollback can find it
    assert not read_status(Promoter(settings, env.registry, target))["tag_disagreements"]
    out = Promoter(settings, env.registry, target).rollback(reason="bad")
    assert serve.slots["production"]["version"] == "2", out.message


def test_an_intent_whose_change_never_reached_the_target_is_dropped(local, monkeypatch):
    """Killed after writing the intent, before the target changed: nothing to finish; the verb runs."""
    env, serve, settings, target = local

    real = LocalTarget.apply

    def killed(self, state):  # noqa: ANN001, ANN202
        raise Killed

    monkeypatch.setattr(LocalTarget, "apply", killed)
    with pytest.raises(Killed):
        Promoter(settings, env.registry, target).canary_set(50)
    monkeypatch.setattr(LocalTarget, "apply", real)
    assert _intents(env) and target.read().percent == 10
    out = Promoter(settings, env.registry, target).canary_set(25)
    assert out.action == "canary_set" and target.read().percent == 25, out.message
    assert not _intents(env)


def test_a_dry_run_reports_an_interrupted_change_and_changes_nothing(local, monkeypatch):
    env, serve, settings, target = local
    _killed_while_tagging(monkeypatch, lambda: Promoter(settings, env.registry, target).rollback(reason="p99"))
    out = Promoter(settings, env.registry, target, dry_run=True).rollback(reason="p99")
    assert "dry run: would finish the interrupted rollback" in out.message, out.message
    assert _status(env, "3") == "canary" and _intents(env)


def _rows(action):
    rows = predlog.open_reader().promotion_events(limit=100).to_dict("records")
    return [r for r in rows if r["action"] == action and r["success"] and not r["dry_run"]]


class NoRows:
    """The prediction log refusing promotion_events inserts (reads work): a ClickHouse outage."""

    def __init__(self):
        self.r = predlog.open_reader()

    def insert_promotion_event(self, row):
        raise RuntimeError("ClickHouse: connection refused")

    def __getattr__(self, k):
        return getattr(self.r, k)


def test_a_failed_row_write_does_not_hold_later_commands_and_tags_once(local):
    env, serve, settings, target = local
    p = Promoter(settings, env.registry, target, reader_factory=NoRows)
    out = p.canary_set(50)
    assert not out.audit_ok and not _intents(env)  # the tags are written: only the row is missing
    n0 = env.registry.resolve("3").tags["promotion.events"]
    out = Promoter(settings, env.registry, target, reader_factory=NoRows).rollback(reason="p99 bad")
    assert "finished" not in out.message and not out.audit_ok, out.message
    assert int(env.registry.resolve("3").tags["promotion.events"]) == int(n0) + 1  # tagged once, not again each run
    assert serve.slots["canary"]["version"] is None, "rollback never happened"


def _promote_partly_done(env, settings, target, monkeypatch) -> None:  # noqa: ANN001
    """v3 at 100 %, promoted on the target; the registry failing at the alias: a partly done row."""
    Promoter(settings, env.registry, target, force=True).canary_set(100)
    real_set = type(env.registry).set_alias

    def down(self, alias, version):  # noqa: ANN001, ANN202
        raise RuntimeError("MLflow 503")

    monkeypatch.setattr(type(env.registry), "set_alias", down)
    with pytest.raises(PartlyDone):
        Promoter(settings, env.registry, target, force=True).promote()
    monkeypatch.setattr(type(env.registry), "set_alias", real_set)


def test_a_resumed_change_killed_before_clearing_its_intent_is_recorded_once(local, monkeypatch):
    env, serve, settings, target = local
    _promote_partly_done(env, settings, target, monkeypatch)
    assert not _intents(env)
    real_del = type(env.registry).delete_model_tag

    def killed(self, key):
        raise Killed

    monkeypatch.setattr(type(env.registry), "delete_model_tag", killed)
    with pytest.raises(Killed):
        Promoter(settings, env.registry, target, force=True).promote()  # resumes: its row written, then killed
    monkeypatch.setattr(type(env.registry), "delete_model_tag", real_del)
    assert len(_rows("promote")) == 2  # the v2 one from the fixture + the resumed v3 one
    out = Promoter(settings, env.registry, target).rollback(reason="bad")
    assert "was complete but for its record" in out.message, out.message  # not a production rollback
    assert len(_rows("promote")) == 2, "a second success row for the same v3 promotion"


def test_a_resumed_change_killed_while_tagging_keeps_the_partial_rows_time_and_from_state(local, monkeypatch):
    env, serve, settings, target = local
    _promote_partly_done(env, settings, target, monkeypatch)
    partial = predlog.open_reader().last_change(target.name, "mot-defects")

    def killed(*a, **k):
        raise Killed

    monkeypatch.setattr(wf, "tag_version", killed)
    with pytest.raises(Killed):
        Promoter(settings, env.registry, target, force=True).promote()
    monkeypatch.setattr(wf, "tag_version", tag_version)
    out = Promoter(settings, env.registry, target, force=True).promote()
    assert "was complete but for its record" in out.message, out.message
    done = [r for r in _rows("promote") if r["to_version"] == "3"]
    d = json.loads(done[0]["details"])
    assert d["from"] == json.loads(partial["details"])["from"], "from-state of the real transition lost"
    assert done[0]["ts"] == partial["ts"]


def test_a_killed_change_finished_later_is_recorded_when_the_target_took_it(local, monkeypatch):
    """The finishing run stamped its own time: a canary step killed before its audit and finished by
    the next command an hour later read as an hour late (row ts and step tags)."""
    from datetime import timedelta

    env, serve, settings, target = local
    _killed_while_tagging(monkeypatch, lambda: Promoter(settings, env.registry, target).canary_set(25))
    (took_effect,) = [t for op, t in serve.took_effect if op == "/canary/percent"][-1:]
    later = wf.utc_now() + timedelta(hours=1)
    monkeypatch.setattr(wf, "utc_now", lambda: later)
    out = Promoter(settings, env.registry, target).canary_set(50)
    assert "finished the interrupted canary_set" in out.message, out.message
    row = _rows("canary_set")[0]
    assert abs((row["ts"].to_pydatetime() - took_effect).total_seconds()) < 5, (row["ts"], took_effect)
    step_at = wf.parse_ts(env.registry.resolve("3").tags["promotion.step_at"])
    assert step_at is not None and abs((step_at - took_effect).total_seconds()) < 5
    assert "applied_at_estimated" not in json.loads(row["details"])


def test_an_interrupted_change_replaced_by_force_is_recorded_as_abandoned(local, monkeypatch):
    """A killed change whose target was changed since ('changed': left to the guard) was overwritten by
    the next --force run's intent: no row said who began it, why, or that it served."""
    env, serve, settings, target = local
    _killed_while_tagging(
        monkeypatch, lambda: Promoter(settings, env.registry, target).canary_set(25, reason="killed step")
    )
    serve.percent = 40.0  # changed by hand since
    with pytest.raises(wf.PromotionError):  # a --force command that does not go ahead replaces nothing
        Promoter(settings, env.registry, target, force=True).promote("99")
    assert _intents(env) and not any("abandoned" in r for r in predlog.open_reader().promotion_events(limit=50).reason)
    out = Promoter(settings, env.registry, target, force=True).canary_set(60, reason="cleanup")
    assert out.action == "canary_set" and target.read().percent == 60, out.message
    rows = predlog.open_reader().promotion_events(limit=100).to_dict("records")
    (abandoned,) = [r for r in rows if "abandoned" in r["reason"]]
    assert abandoned["action"] == "canary_set" and not bool(abandoned["success"]), abandoned
    assert "killed step" in abandoned["reason"] and json.loads(abandoned["details"])["abandoned"] is True
    assert rows[0]["action"] == "canary_set" and "cleanup" in rows[0]["reason"] and bool(rows[0]["success"])
    assert not _intents(env)
