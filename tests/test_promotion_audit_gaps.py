"""Rollout safety and audit details: a running canary cannot be restarted past its step gates, the
canary share metric follows the live state, holds and rejections account for their audit, and
`status` shows the drift job's own verdict."""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime, timedelta

import pytest
from promotion_support import drift_report, make_env

from promotion.locking import LockBusy
from promotion.status import read_status
from promotion.tags import STARTED_AT_TAG, STEP_AT_TAG
from promotion.targets import GitOpsTarget
from promotion.workflow import Promoter, PromotionError, Refused
from training.registry import DIGEST_TAG

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@pytest.fixture
def canary(registry, tiny_bundle, tmp_path, monkeypatch):
    """Production v1 on the GitOps overlay, v2 canary at 10 %."""
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.61, 0.62])
    target = GitOpsTarget(env.settings())
    Promoter(env.settings(golden_check=False), registry, target, force=True).promote("1")
    Promoter(env.settings(golden_check=False), registry, target).canary_start("2", 10)
    return env, target


def _promoter(env, target, **kw):
    return Promoter(env.settings(golden_check=False, **kw), env.registry, target)


def test_a_running_canary_is_not_restarted(canary):
    """`canary start V` for the canary already running once raised its share behind offline gates only
    and re-stamped its start, hiding drift found since then."""
    env, target = canary
    started = env.registry.resolve("2").tags[STARTED_AT_TAG]
    drift_report("2", detected=True)
    with pytest.raises(PromotionError, match="already running at 10%.*canary set"):
        _promoter(env, target).canary_start("2", 50)
    assert target.read().percent == 10 and env.registry.resolve("2").tags[STARTED_AT_TAG] == started
    with pytest.raises(Refused, match="drift: fail"):  # the drift found since the start still counts
        _promoter(env, target, min_samples=0).advance()


def test_canary_percent_metric_follows_the_live_share_after_a_refusal(canary, tmp_path):
    env, target = canary
    prom = tmp_path / "promotion.prom"
    with pytest.raises(Refused):  # no evidence yet: the gates wait
        _promoter(env, target, textfile=prom).advance()
    assert "motlens_canary_percent 10.0" in prom.read_text()  # was exported as 0 while 10 % served


def test_a_hold_whose_metrics_cannot_be_exported_reports_the_audit_gap(canary):
    env, target = canary
    out = _promoter(env, target, pushgateway_url="http://127.0.0.1:1").auto()
    assert out.action == "hold" and out.audit_ok is False
    assert not out.message.startswith("hold:")  # the CLI prints "hold: <message>" once


def test_a_run_that_finds_the_lock_busy_is_recorded_as_a_hold(canary, monkeypatch):
    import predlog

    env, target = canary

    def busy(*, blocking=True):
        raise LockBusy("the promotion lock is held by another run")

    monkeypatch.setattr(target, "lock", busy)
    out = _promoter(env, target).auto()
    assert out.action == "hold" and out.audit_ok
    rows = predlog.open_reader().promotion_events(limit=5).to_dict("records")
    assert rows[0]["action"] == "hold" and "held by another run" in rows[0]["reason"]


def test_status_shows_the_drift_jobs_verdict_not_just_the_flag(canary, monkeypatch, capsys):
    import predlog
    from promotion.cli import _print_status

    env, target = canary
    drift_report("2", detected=False)
    reader = predlog.open_reader()
    row = reader.drift_reports(model_version="2", limit=1).to_dict("records")[0]
    row["details"] = json.dumps({"status": "insufficient_data"})
    row["ts"] = datetime.now(UTC) + timedelta(seconds=1)  # the newest report
    reader.insert_drift_report(row)
    status = read_status(_promoter(env, target))
    assert _print_status(status, as_json=False) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "insufficient data" in out and "no drift" not in out


@pytest.fixture
def production(registry, tiny_bundle, tmp_path, monkeypatch):
    """Production v1 on the GitOps overlay, nothing else running."""
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.61, 0.62])
    target = GitOpsTarget(env.settings())
    Promoter(env.settings(golden_check=False), registry, target, force=True).promote("1")
    return env, target


def test_a_failure_before_anything_changed_says_so(production, monkeypatch):
    env, target = production
    before = (target.overlay / "rollout.yaml").read_text()

    def broken(desired):
        raise OSError("disk full")

    monkeypatch.setattr(target, "apply", broken)
    with pytest.raises(PromotionError, match="failed, nothing was changed: disk full"):
        _promoter(env, target).canary_start("2", 10)
    assert (target.overlay / "rollout.yaml").read_text() == before and "canary" not in env.registry.aliases()


def test_a_failure_after_the_target_changed_is_partly_done_and_a_rerun_finishes_it(production, monkeypatch):
    from promotion.workflow import PartlyDone

    env, target = production
    real = env.registry.set_alias

    def broken(alias, version):
        raise RuntimeError("registry went away")

    monkeypatch.setattr(env.registry, "set_alias", broken)
    with pytest.raises(PartlyDone, match="failed part-way: registry went away"):
        _promoter(env, target).canary_start("2", 10)
    assert target.read().canary_version == "2" and "canary" not in env.registry.aliases()
    monkeypatch.setattr(env.registry, "set_alias", real)
    _promoter(env, target).canary_start("2", 10)  # the same command again finishes it
    assert env.registry.aliases()["canary"] == "2" and target.read().percent == 10
    # the trail: the change happened in the first run; the re-run's row says so and keeps its time
    import predlog
    from promotion.cli import _event_marks

    rows = [r for r in predlog.open_reader().promotion_events(limit=10).to_dict("records")
            if r["action"] == "canary_start"]  # fmt: skip
    assert len(rows) == 2  # one time, so in either order
    done, partial = sorted(rows, key=lambda r: not r["success"])
    partial_details, done_details = json.loads(partial["details"]), json.loads(done["details"])
    assert not partial["success"] and partial_details["partial"] and _event_marks(partial) == ["partly done"]
    applied = partial_details["applied_at"]
    at = datetime.fromisoformat(applied)
    assert abs(partial["ts"] - at) < timedelta(milliseconds=1)  # the row's DateTime64(3)
    assert done["success"] and done_details["resumes"] == applied and abs(done["ts"] - at) < timedelta(milliseconds=1)
    assert done_details["from"] == partial_details["from"] == "production v1 at 100%"
    assert done_details["to"] == partial_details["to"] != done_details["from"]
    tags = env.registry.resolve("2").tags
    assert tags[STARTED_AT_TAG] == tags[STEP_AT_TAG] == applied


def test_a_refusal_because_the_live_state_disagrees_is_recorded(production, tmp_path):
    """Exit 3 from the guard (the live state disagrees with the registry) wrote no promotion_events row,
    from a command or from `auto` (the CronJob blocked with nothing in the trail saying why)."""
    import predlog

    env, target = production
    env.registry.set_alias("production", "2")  # by hand: the registry no longer says what serves
    before = len(predlog.open_reader().promotion_events(limit=1000))
    with pytest.raises(Refused, match="disagrees with the registry"):
        _promoter(env, target).canary_start("3", 10)
    with pytest.raises(Refused, match="disagrees with the registry"):
        _promoter(env, target).auto()
    rows = predlog.open_reader().promotion_events(limit=1000).to_dict("records")
    assert len(rows) == before + 2
    for row, action in zip(rows[:2], ("hold", "canary_start"), strict=True):
        details = json.loads(row["details"])
        assert row["action"] == action and not row["success"] and details["refused"], row
        assert details["from"] == details["to"] == "production v1 at 100%"
        assert "disagrees with the registry" in row["reason"] and "'production' alias" in row["reason"]


def test_cli_exit_code_for_a_partly_done_action_is_1(production, monkeypatch, capsys):
    from promotion import cli

    env, target = production
    monkeypatch.setenv("MOTLENS_PROMOTE_TARGET", "gitops")
    monkeypatch.setenv("MOTLENS_PROMOTE_MANIFESTS_DIR", str(env.manifests))
    monkeypatch.setenv("MOTLENS_PROMOTE_GOLDEN_CHECK", "false")

    def broken(self, alias, version):
        raise RuntimeError("registry went away")

    from training.registry import Registry

    monkeypatch.setattr(Registry, "set_alias", broken)
    from motlens.cli import main

    assert main(["promote", "canary", "start", "2", "--percent", "10"]) == cli.EXIT_AUDIT
    assert "failed part-way" in capsys.readouterr().err


def test_a_replaced_or_dropped_canary_is_retired_with_the_reason(canary):
    env, target = canary
    p = _promoter(env, target)
    p.force = True
    p.canary_start("3", 10)
    tags = env.registry.resolve("2").tags
    assert tags["promotion.status"] == "retired" and tags["promotion.retired_reason"] == "replaced by 3"
    p.promote("1")  # a direct deploy while canary 3 runs drops it
    tags = env.registry.resolve("3").tags
    assert tags["promotion.status"] == "retired" and "canary dropped: deployed 1" in tags["promotion.retired_reason"]
    statuses = {v["version"]: v["status"] for v in read_status(p)["versions"]}
    assert list(statuses.values()).count("canary") == 0


def test_local_target_sets_a_whole_percent_over_a_fractional_one(tmp_path, monkeypatch):
    """A share set by hand to 12.5 % reads as 12; `canary set 12` must still send 12 (it once sent nothing)."""
    from promotion.local_target import LocalTarget
    from promotion.settings import PromoteSettings

    monkeypatch.setenv("MOTLENS_HOME", str(tmp_path))
    target = LocalTarget(PromoteSettings(target="local", local_url="http://127.0.0.1:1"))
    slots = {
        "slots": {
            "production": {"version": "1", "ref": "models:/mot-defects@production"},
            "canary": {"version": "2", "ref": "models:/mot-defects/2"},
        },
        "canary_percent": 12.5,
        "ready": True,
    }
    monkeypatch.setattr(target, "slots", lambda: slots)
    live = target.read()
    assert live.percent == 12 and live.production_uri == "models:/mot-defects/1"  # the alias ref, pinned
    assert target.plan(live.with_percent(12)) == [
        {"method": "POST", "path": "/motlens/admin/canary/percent", "body": {"percent": 12}}
    ]
    slots["canary_percent"] = 12.0
    assert target.plan(live.with_percent(12)) == []


def test_rollback_refuses_to_reject_what_serves_production(production, monkeypatch):
    """After an interrupted promote (live: v2 production; aliases: canary 2), a forced rollback once
    'rolled back' nothing and tagged the serving version rejected."""
    env, target = production
    p = _promoter(env, target)
    p.canary_start("2", 100)

    def broken(alias):
        raise RuntimeError("registry went away")

    real = env.registry.delete_alias
    monkeypatch.setattr(env.registry, "delete_alias", broken)
    p.force = True  # no traffic evidence in this test: past the gates
    with pytest.raises(Exception, match="part-way"):
        p.promote()
    monkeypatch.setattr(env.registry, "delete_alias", real)
    assert target.read().production_version == "2" and env.registry.aliases().get("canary") == "2"
    with pytest.raises(PromotionError, match="already serves production"):
        p.rollback()
    assert env.registry.resolve("2").tags.get("promotion.status") != "rejected"


def test_a_fresh_overlay_names_the_way_out(registry, tiny_bundle, tmp_path, monkeypatch):
    """The base manifest's placeholder says production v1: `promote promote 1` and `canary start 1`
    once sent the user to each other; both now name --force, which adopts it."""
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.61])
    target = GitOpsTarget(env.settings())
    p = _promoter(env, target)
    with pytest.raises(PromotionError, match="names version 1 as production but serves s3://.*, not its artifact "
                                             "URI; --force adopts it"):  # fmt: skip
        p.promote("1")
    with pytest.raises(PromotionError, match="already production; `motlens promote promote 1 --force` adopts"):
        p.canary_start("1", 10)
    p.force = True
    p.promote("1")
    assert env.registry.aliases() == {"production": "1"}
    p.force = False
    with pytest.raises(PromotionError, match=r"version 1 is already production on [^;]*$"):
        p.promote("1")


@pytest.mark.parametrize("version", ["1", "2"])
def test_the_registrys_production_is_deployed_over_what_the_overlay_serves(
    registry, tiny_bundle, tmp_path, monkeypatch, version
):
    """What `motlens demo` and `motlens train --alias production` leave: the alias names a version the
    overlay does not serve (the base's placeholder: "v1" at a URI that is no version's). `promote promote
    V` once refused: 'version V is already production on gitops overlay …' (and `canary start V` too)."""
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.61])
    target = GitOpsTarget(env.settings())
    registry.set_alias("production", version)
    p = _promoter(env, target)
    assert read_status(p)["disagreements"]
    placeholder = "production v1 at 100% from s3://.*/0{32}/"
    with pytest.raises(PromotionError, match=f"alias names version {version} but .* serves {placeholder}.*: "
                                             f"deploy it with `motlens promote promote {version}`"):  # fmt: skip
        p.canary_start(version, 10)
    out = p.promote(version)
    assert out.action == "deploy" and [(r.name, r.status) for r in out.gates] == [("offline", "pass")]
    live = target.read()
    assert (live.production_version, live.storage_uri) == (version, registry.resolve(version).artifact_uri)
    assert registry.aliases() == {"production": version} and read_status(p)["disagreements"] == []
    assert registry.resolve("1").tags.get("promotion.status") == ("production" if version == "1" else None)
    written = (target.overlay / "rollout.yaml").read_text()
    agreed = "it serves it and the registry's 'production' alias names it$"
    with pytest.raises(PromotionError, match=f"version {version} is already production on .*: {agreed}"):
        p.promote(version)
    assert (target.overlay / "rollout.yaml").read_text() == written


def test_deploying_the_registrys_production_is_gated_against_the_serving_version(registry, tiny_bundle, tmp_path,
                                                                                 monkeypatch):  # fmt: skip
    """The alias moved by hand (or by `train --alias production`) to a worse version than the one the overlay
    serves: the deploy compares the two offline and refuses; --force proceeds and retires the replaced one."""
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.50])
    target = GitOpsTarget(env.settings())
    Promoter(env.settings(golden_check=False), registry, target, force=True).promote("1")
    registry.set_alias("production", "2")
    before = (target.overlay / "rollout.yaml").read_text()
    p = _promoter(env, target)
    with pytest.raises(Refused, match="offline: fail"):
        p.promote("2")
    assert (target.overlay / "rollout.yaml").read_text() == before and registry.aliases() == {"production": "2"}
    row = p.reader().promotion_events(limit=1).iloc[0]  # the refusal's row says what stayed live
    serving = target.read().describe()
    assert (row["action"], bool(row["success"])) == ("deploy", False)
    assert (
        json.loads(row["details"]) == {"from": serving, "to": serving, "refused": True} and "production v1" in serving
    )
    p.force = True
    p.promote("2")
    assert target.read().production_version == "2" and registry.resolve("1").tags["promotion.status"] == "retired"


def test_an_interrupted_first_deployment_is_finished_by_a_rerun(registry, tiny_bundle, tmp_path, monkeypatch):
    """The manifest written, the process gone before the alias: `promote promote 1` again once said 'version 1
    is already production' and wanted --force."""
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60])
    target = GitOpsTarget(env.settings())
    info = registry.resolve("1")
    target.apply(target.read().deployed("1", info.artifact_uri, info.tags[DIGEST_TAG]))  # what a deploy writes
    written = (target.overlay / "rollout.yaml").read_text()
    p = _promoter(env, target)
    with pytest.raises(PromotionError, match=r"already production; `motlens promote promote 1` sets the registry"):
        p.canary_start("1", 10)  # it once advised --force, which this state does not need
    p.promote("1")
    assert registry.aliases() == {"production": "1"} and (target.overlay / "rollout.yaml").read_text() == written
    assert registry.resolve("1").tags["promotion.status"] == "production" and read_status(p)["disagreements"] == []


def _fails_on_the_registry(env, monkeypatch, method: str):
    def broken(*args):
        raise RuntimeError("registry went away")

    real = getattr(env.registry, method)
    monkeypatch.setattr(env.registry, method, broken)
    return lambda: monkeypatch.setattr(env.registry, method, real)


def _successful(action: str) -> dict:
    import predlog

    rows = predlog.open_reader().promotion_events(limit=50).to_dict("records")
    return next(r for r in rows if r["action"] == action and r["success"])


def test_a_rerun_that_fails_again_keeps_the_change_partly_done(production, monkeypatch):
    """The second run failed too (registry still down) and wrote a plain failed row: the third, which
    finished, took that as the newest and stamped its own time, the real transition lost. The lookup
    now passes over failures that changed nothing; and no row but the first says partly done."""
    from promotion.workflow import PartlyDone

    env, target = production
    restore = _fails_on_the_registry(env, monkeypatch, "set_alias")
    with pytest.raises(PartlyDone):
        _promoter(env, target).canary_start("2", 10)
    with pytest.raises(PromotionError, match="nothing was changed"):
        _promoter(env, target).canary_start("2", 10)
    restore()
    _promoter(env, target).canary_start("2", 10)
    done = json.loads(_successful("canary_start")["details"])
    assert "resumes" in done and done["from"] == "production v1 at 100%", done
    import predlog

    rows = [r for r in predlog.open_reader().promotion_events(limit=10).to_dict("records")
            if r["action"] == "canary_start"]  # fmt: skip
    assert [json.loads(r["details"]).get("partial", False) for r in rows].count(True) == 1


def test_a_partly_done_change_is_finished_however_many_holds_came_after_it(production, monkeypatch):
    """The lookup read the trail's newest 500 rows: an ``auto`` run refused every 10 minutes for
    four days buried the partly done row, and the re-run recorded itself as the change."""
    import pyarrow as pa

    import predlog
    from predlog.schema import arrow_schema
    from promotion.workflow import PartlyDone

    env, target = production
    restore = _fails_on_the_registry(env, monkeypatch, "set_alias")
    with pytest.raises(PartlyDone):
        _promoter(env, target).canary_start("2", 10)
    restore()
    partial = next(r for r in predlog.open_reader().promotion_events(limit=5).to_dict("records")
                   if json.loads(r["details"]).get("partial"))  # fmt: skip
    base = {"model_name": partial["model_name"], "from_version": "2", "to_version": "2", "canary_percent": 10.0,
            "target": target.name, "actor": "auto", "reason": "refused", "gates": "{}", "details": "{}"}  # fmt: skip
    after = partial["ts"] + timedelta(milliseconds=1)
    rows = [{**base, "ts": after + timedelta(milliseconds=i), "action": "hold", "dry_run": False, "success": False}
            for i in range(600)]  # fmt: skip
    rows.append({**base, "ts": after, "action": "advance", "dry_run": True, "success": True})  # changes nothing
    reader = predlog.open_reader()
    reader.source.insert("promotion_events", pa.Table.from_pylist(rows, schema=arrow_schema("promotion_events")))
    _promoter(env, target).canary_start("2", 10)
    done = reader.last_change(target.name, partial["model_name"])
    assert done["success"] and done["action"] == "canary_start", done
    assert json.loads(done["details"])["resumes"] == json.loads(partial["details"])["applied_at"], done


def test_a_partial_row_of_an_earlier_rollout_is_not_resumed(production, monkeypatch):
    """Cycle 1's rollback took the target and failed on the registry (fixed by hand); cycle 2's rollback
    died after the target took it, and its re-run was recorded as cycle 1's, at cycle 1's time."""
    from promotion.workflow import PartlyDone

    env, target = production
    _promoter(env, target).canary_start("2", 10)
    restore = _fails_on_the_registry(env, monkeypatch, "delete_alias")
    with pytest.raises(PartlyDone):
        _promoter(env, target).rollback()
    restore()
    env.registry.delete_alias("canary")  # fixed by hand
    _promoter(env, target).canary_start("3", 10)
    target.apply(target.read().with_percent(0).rolled_back())  # a rollback killed once the target took it
    _promoter(env, target).rollback()  # its re-run
    row = _successful("rollback")
    assert row["from_version"] == "3" and "resumes" not in json.loads(row["details"]), row
    tags = env.registry.resolve("3").tags
    assert tags["promotion.rejected_at"] >= tags[STARTED_AT_TAG]


def test_auto_refused_by_a_disagreement_tags_no_version(canary):
    env, target = canary
    env.registry.set_alias("production", "2")  # by hand
    events = env.registry.resolve("2").tags.get("promotion.events")
    for _ in range(2):
        with pytest.raises(Refused):
            _promoter(env, target).auto()
    assert env.registry.resolve("2").tags.get("promotion.events") == events  # rows only, as every hold
