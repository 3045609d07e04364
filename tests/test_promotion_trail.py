"""The operator's audit trail on the local target: an event's time is when the change took effect, the
actor is never "unknown", a rejected or retired version is not rolled out again without --force (and
the override is recorded), a promotion can be rolled back to the version it replaced, and every
mutating verb takes --reason.

The local target drives `motlens serve`'s admin API; here an in-process stand-in answers it (slots,
percent, promote, rollback), so each test runs in a second, not a real server's minutes."""

from __future__ import annotations

import shutil
import time
from datetime import UTC, datetime
from typing import Any

import pytest
from promotion_support import FakeServe, make_env

from promotion.local_target import LocalTarget
from promotion.status import read_status
from promotion.tags import PREVIOUS_TAG
from promotion.workflow import Promoter, PromotionError, Refused

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl renders the overlay copy")


@pytest.fixture
def local(registry, tiny_bundle, tmp_path, monkeypatch):
    """v1 (0.60) in production on a local server, v2 (0.65), v3 (0.40: worse offline) registered."""
    env = make_env(registry, tiny_bundle.root, tmp_path, monkeypatch, [0.60, 0.65, 0.40])
    registry.set_alias("production", "1")
    serve = FakeServe("1")
    def request(self, method, path, body=None):
        return serve.request(method, path, body)

    monkeypatch.setattr(LocalTarget, "_request", request)
    settings = env.settings(target="local", local_url="http://127.0.0.1:1", golden_check=False)
    return env, serve, settings, LocalTarget(settings)


def _events(limit: int = 20) -> list[dict[str, Any]]:
    import predlog

    return predlog.open_reader().promotion_events(limit=limit).to_dict("records")


def _utc(ts: Any) -> datetime:
    ts = ts.to_pydatetime() if hasattr(ts, "to_pydatetime") else ts
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)


# ------------------------------------------------------------------ 1: an event's time


def test_an_events_time_is_when_the_change_took_effect(local):
    """The audit once stamped the time the command started: the canary_start row said 22:48:04 while
    the first canary request came 39 s later (gates, model load); rows read as if traffic moved early."""
    env, serve, settings, target = local
    serve.load_s = 0.5  # the server loads the model and checks it before it swaps
    golden_done: list[datetime] = []

    def golden(version):
        time.sleep(0.3)
        golden_done.append(datetime.now(UTC))
        return True, 1.0, "ok"

    p = Promoter(settings.model_copy(update={"golden_check": True}), env.registry, target, golden_check=golden)
    # a refusal is stamped when the gates decided (after a slow golden check), not when the run began
    with pytest.raises(Refused, match="offline: fail"):
        p.canary_start("3", 10)
    row = _events(1)[0]
    assert (row["action"], bool(row["success"])) == ("canary_start", False)
    assert _utc(row["ts"]) >= _ms(golden_done[-1])

    p.canary_start("2", 10)
    swapped = next(t for op, t in serve.took_effect if op.endswith("/load"))
    row = _events(1)[0]
    assert (row["action"], bool(row["success"])) == ("canary_start", True)
    assert _utc(row["ts"]) >= _ms(swapped)  # it once was ~0.8 s earlier: before the gates and the load
    tags = env.registry.resolve("2").tags
    assert datetime.fromisoformat(tags["promotion.last_at"]) >= swapped  # the version's tags say the same
    assert tags["promotion.last_at"] == tags["promotion.step_at"]  # one time for the change

    p.rollback(reason="done")
    rolled = serve.took_effect[-1]
    assert rolled[0] == "/rollback" and _utc(_events(1)[0]["ts"]) >= _ms(rolled[1])


def _ms(t: datetime) -> datetime:
    """``t`` cut to the millisecond, the prediction log's precision."""
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


# ------------------------------------------------------------------ 3: who acted


def test_the_actor_is_never_unknown(monkeypatch):
    """A CronJob pod has no $USER or $LOGNAME and its uid (10001) no passwd entry: the audit once said
    'unknown'. It now falls back to the passwd entry, else the uid, and names the host (the pod)."""
    import getpass
    import os
    import socket

    from promotion.settings import PromoteSettings

    for var in ("USER", "LOGNAME", "LNAME", "USERNAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MOTLENS_PROMOTE_ACTOR", raising=False)
    monkeypatch.setattr(socket, "gethostname", lambda: "motlens-promotion-29386-x7k")

    def no_entry():
        raise KeyError(f"getpwuid(): uid not found: {os.getuid()}")  # OSError on Python 3.13

    monkeypatch.setattr(getpass, "getuser", no_entry)
    assert PromoteSettings().who == f"uid {os.getuid()}@motlens-promotion-29386-x7k"
    monkeypatch.setattr(getpass, "getuser", lambda: "svc")  # the passwd entry
    assert PromoteSettings().who == "svc@motlens-promotion-29386-x7k"
    monkeypatch.setenv("LOGNAME", "carol")
    assert PromoteSettings().who == "carol@motlens-promotion-29386-x7k"
    monkeypatch.setenv("USER", "bob")
    assert PromoteSettings().who == "bob@motlens-promotion-29386-x7k"
    monkeypatch.setenv("MOTLENS_PROMOTE_ACTOR", "cronjob/motlens-promotion@pod-1")  # as the manifest sets it
    assert PromoteSettings().who == "cronjob/motlens-promotion@pod-1"
    assert PromoteSettings(actor="alice").who == "alice"


# ------------------------------------------------------------------ 4: verdicts are kept


def test_a_rejected_version_is_not_canaried_again_without_force(local):
    """Rolled back for drift, v2 could be canaried again 10 s later with exit 0 and a stale
    promotion.rejected_reason; the verdict was forgotten."""
    env, serve, settings, target = local
    p = Promoter(settings, env.registry, target)
    p.canary_start("2", 10)
    p.rollback(reason="drift found by the auditor")
    rejected_at = env.registry.resolve("2").tags["promotion.rejected_at"]
    assert datetime.fromisoformat(rejected_at) <= datetime.now(UTC)
    with pytest.raises(Refused) as refused:
        p.canary_start("2", 25)
    message = str(refused.value)
    assert f"version 2 was rejected at {rejected_at}: drift found by the auditor" in message and "--force" in message
    assert serve.slots["canary"]["version"] is None and "canary" not in env.registry.aliases()
    row = _events(1)[0]  # the refusal is on the record
    assert (row["action"], bool(row["success"])) == ("canary_start", False)
    assert "refused: version 2 was rejected" in row["reason"]

    # `auto` follows the same rule (it holds, naming the verdict and the override)
    env.registry.set_alias("candidate", "2")
    held = p.auto()
    assert held.action == "hold" and "was rejected at" in held.message and "drift found by the auditor" in held.message
    assert "canary start 2 --force" in held.message

    p.force = True
    p.canary_start("2", 25, reason="retrained the embedder; the drift was a bad reference")
    tags = env.registry.resolve("2").tags
    assert tags["promotion.status"] == "canary" and tags["promotion.canary_percent"] == "25"
    assert tags["promotion.rejected_reason"] == "" and tags["promotion.rejected_at"] == ""  # no stale verdict
    assert tags["promotion.previous_rejected_reason"] == "drift found by the auditor"
    assert tags["promotion.previous_rejected_at"] == rejected_at
    row = _events(1)[0]
    assert row["reason"].startswith("retrained the embedder; the drift was a bad reference; forced past status "
                                    "rejected: version 2 was rejected at")  # fmt: skip
    assert tags["promotion.last_reason"] == row["reason"]


def test_a_retired_version_is_not_rolled_out_again_without_force(local):
    """Once replaced in production, v1 is retired: `canary start 1` and `promote 1` (when the alias names
    it again) are refused, naming why it was retired."""
    env, serve, settings, target = local
    p = Promoter(settings, env.registry, target, force=True)
    p.canary_start("2", 10)
    p.promote()  # past the live gates: this test has no traffic
    p.force = False
    retired = env.registry.resolve("1").tags
    assert retired["promotion.status"] == "retired"
    assert retired["promotion.retired_reason"] == "replaced in production by version 2"
    with pytest.raises(Refused) as refused:
        p.canary_start("1", 10)
    assert f"version 1 was retired at {retired['promotion.retired_at']}: replaced in production by version 2" in str(
        refused.value
    )
    env.registry.set_alias("candidate", "1")
    assert "candidate version 1 was retired" in p.auto().message


def test_promote_of_a_rejected_version_named_by_the_alias_is_refused(local):
    """`promote V` deploys the version the 'production' alias names without --force: an alias moved by
    hand to a rejected version once deployed it straight past the verdict."""
    env, serve, settings, target = local
    p = Promoter(settings, env.registry, target)
    p.canary_start("2", 10)
    p.rollback(reason="error rate 20%")
    env.registry.set_alias("production", "2")
    with pytest.raises(Refused, match="deploying version 2 refused: version 2 was rejected at .*: error rate 20%"):
        p.promote("2")
    assert serve.slots["production"]["version"] == "1"


def test_promote_of_a_rejected_version_is_refused_as_rejected_not_sent_to_canary_start(local):
    """`promote V` of a rejected version while another serves answered "roll out V with `motlens promote
    canary start V`" (exit 2), a hint then refused as rejected; docs/promotion.md "Gates": exit 3 naming
    the verdict and --force, recorded."""
    env, serve, settings, target = local
    p = Promoter(settings, env.registry, target)
    p.canary_start("2", 10)
    p.rollback(reason="manual test")
    with pytest.raises(Refused, match="deploying version 2 refused: version 2 was rejected at .*: manual test") as e:
        p.promote("2")
    assert "--force" in str(e.value) and "canary start" not in str(e.value)
    row = _events(1)[0]
    assert (row["action"], bool(row["success"])) == ("deploy", False)
    assert "refused: version 2 was rejected" in row["reason"]
    assert serve.slots["production"]["version"] == "1"


def test_a_verdict_an_older_release_dated_only_in_its_event_tags_gives_that_time(local):
    """Releases before promotion.{status}_at tagged a rolled-back version with promotion.last_action and
    promotion.last_at only: it read "rejected (time not recorded)" though its time was on the version."""
    env, serve, settings, target = local
    old = {"promotion.status": "rejected", "promotion.rejected_reason": "auto: drift",
           "promotion.last_action": "rollback", "promotion.last_at": "2026-11-30T14:17:28.991+00:00"}  # fmt: skip
    env.registry.set_tags("2", old)
    env.registry.set_tags("3", {"promotion.status": "retired", "promotion.last_action": "promote",
                                "promotion.last_at": "2026-11-29T09:00:00+00:00"})  # fmt: skip
    p = Promoter(settings, env.registry, target)
    with pytest.raises(Refused, match=r"version 2 was rejected at 2026-11-30T14:17:28\.991\+00:00: auto: drift"):
        p.canary_start("2", 10)
    with pytest.raises(Refused, match=r"version 3 was retired at 2026-11-29T09:00:00\+00:00: no reason recorded"):
        p.canary_start("3", 10)
    env.registry.set_tags("2", {"promotion.last_action": "hold"})  # a later event: last_at no longer dates it
    with pytest.raises(Refused, match=r"version 2 was rejected \(time not recorded\): auto: drift"):
        p.canary_start("2", 10)


# ------------------------------------------------------------------ 5: rolling a promotion back


def _promoted(env, settings, target, **kw):
    """v1 → canary v2 → promoted (forced past the live gates: no traffic here)."""
    p = Promoter(settings, env.registry, target, force=True, **kw)
    p.canary_start("2", 10)
    p.promote()
    p.force = False
    assert env.registry.aliases()["production"] == "2"
    return p


def test_rollback_after_a_promotion_restores_the_previous_production(local):
    """After a promotion `rollback --reason …` said 'no canary to roll back' (exit 2), and `promote 1
    --force` was recorded as a forced deploy of a worse model. Now it restores the version the
    promotion replaced, recorded as a rollback, through the golden check but not the offline gate (v1
    scores lower than v2: that is not a reason to keep a broken v2)."""
    env, serve, settings, target = local
    checked = []

    def golden(version):
        checked.append(version)
        return True, 1.0, "ok"

    p = _promoted(env, settings.model_copy(update={"golden_check": True}), target, golden_check=golden)
    assert env.registry.resolve("2").tags[PREVIOUS_TAG] == "1"
    out = p.rollback(reason="p99 doubled after the promotion")
    assert out.action == "rollback" and [r.name for r in out.gates] == ["golden"]
    assert serve.slots["production"] == {"version": "1", "ref": "models:/mot-defects/1"}
    assert serve.slots["canary"]["version"] is None
    assert env.registry.aliases()["production"] == "1" and read_status(p)["disagreements"] == []
    row = _events(1)[0]
    assert (row["action"], row["from_version"], row["to_version"], bool(row["success"])) == ("rollback", "2", "1", True)
    assert row["reason"] == "p99 doubled after the promotion"
    v1, v2 = env.registry.resolve("1").tags, env.registry.resolve("2").tags
    assert v2["promotion.status"] == "rejected" and v2["promotion.rejected_reason"] == "p99 doubled after the promotion"
    assert v1["promotion.status"] == "production" and v1["promotion.retired_reason"] == ""
    assert v1["promotion.previous_retired_reason"] == "replaced in production by version 2"
    assert v1["promotion.last_action"] == "rollback" and v1[PREVIOUS_TAG] == "2"

    # rolling back again would restore the version just rejected: refused, named
    with pytest.raises(Refused, match="from version 1 to 2 .* refused: version 2 was rejected"):
        p.rollback(reason="again")
    assert serve.slots["production"]["version"] == "1"


def test_rollback_without_a_previous_production_says_so(local):
    env, serve, settings, target = local
    p = Promoter(settings, env.registry, target)
    with pytest.raises(PromotionError, match="no canary to roll back .* and no production version before version 1 "
                                             "is recorded"):  # fmt: skip
        p.rollback()


def test_rollback_after_a_promotion_is_held_by_a_failing_golden_check(local):
    env, serve, settings, target = local
    verdicts = {"2": True, "1": False}
    p = _promoted(env, settings.model_copy(update={"golden_check": True}), target,
                  golden_check=lambda v: (verdicts[v], 0.5, "labels differ"))  # fmt: skip
    with pytest.raises(Refused, match="golden: fail"):
        p.rollback(reason="bad")
    assert serve.slots["production"]["version"] == "2" and env.registry.aliases()["production"] == "2"


def test_rollback_finds_the_previous_production_in_promotion_events(local):
    """A version promoted before the promotion.previous_production tag existed: the events table says."""
    env, serve, settings, target = local
    p = _promoted(env, settings, target)
    env.registry.client.delete_model_version_tag("mot-defects", "2", PREVIOUS_TAG)
    assert p.previous_production("2")[0] == "1"
    p.rollback(reason="old registry")
    assert serve.slots["production"]["version"] == "1"


def test_a_canary_rolled_back_since_does_not_hide_that_promotion(local):
    """A canary rollback's row names the production it kept as its to_version; it was read as the newest
    change that made that version production, hiding the promote row, so a later production rollback
    found no version before it (for a version promoted before the tag existed)."""
    env, serve, settings, target = local
    p = _promoted(env, settings, target)
    env.registry.client.delete_model_version_tag("mot-defects", "2", PREVIOUS_TAG)
    p.force = True  # v3 scores lower offline
    p.canary_start("3", 10)
    p.force = False
    p.rollback(reason="canary 3 bad")
    assert serve.slots["production"]["version"] == "2" and serve.slots["canary"]["version"] is None
    before, where = p.previous_production("2")
    assert before == "1" and where.startswith("the promotion_events table: promote 1→2"), where
    p.rollback(reason="old registry")
    assert serve.slots["production"]["version"] == "1"


# ------------------------------------------------------------------ --reason everywhere


def test_every_mutating_verb_takes_a_reason(local, monkeypatch, capsys):
    from motlens.cli import main

    env, serve, settings, target = local
    monkeypatch.setenv("MOTLENS_PROMOTE_TARGET", "local")
    monkeypatch.setenv("MOTLENS_PROMOTE_LOCAL_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("MOTLENS_PROMOTE_GOLDEN_CHECK", "false")
    monkeypatch.setenv("MOTLENS_PROMOTE_ACTOR", "alice")
    runs = [
        (["canary", "start", "2", "--percent", "10", "--reason", "ticket MOT-1"], "canary_start", "ticket MOT-1"),
        (["canary", "set", "20", "--reason", "more traffic"], "canary_set", "more traffic"),
        (["advance", "--force", "--reason", "weekend"], "advance", "weekend; forced past gates"),
        (["promote", "--force", "--reason", "signed off"], "promote", "signed off; forced past gates"),
        (["rollback", "--reason", "p99"], "rollback", "p99"),
    ]
    for argv, action, reason in runs:
        assert main(["promote", *argv]) == 0, (argv, capsys.readouterr().err)
        row = _events(1)[0]
        assert row["action"] == action and row["reason"].startswith(reason) and row["actor"] == "alice", row
        assert env.registry.resolve(row["to_version"]).tags["promotion.last_reason"] == row["reason"]
    assert serve.slots["production"]["version"] == "1" and env.registry.aliases()["production"] == "1"
    capsys.readouterr()
    assert main(["promote", "canary", "start", "2", "--percent", "10"]) == 3  # rejected by the rollback
    err = capsys.readouterr().err
    assert "version 2 was rejected at" in err and ": p99" in err and "--force" in err


# ------------------------------------------------------------------ review of the trail changes


def test_rollback_after_a_followed_alias_move_restores_what_it_replaced(local):
    """1 → 2 → 3 through motlens, then the alias moved back to 2 by hand and a server followed it: v2's
    tag still named v1 (its first time in production), so `rollback` went to v1, not to v3."""
    import predlog
    from predictor.events import follow_row

    env, serve, settings, target = local
    forced = Promoter(settings, env.registry, target, force=True)
    forced.promote("2")
    forced.promote("3")
    env.registry.set_alias("production", "2")  # outside motlens; the follower swaps and writes its row
    serve.slots["production"] = {"version": "2", "ref": "models:/mot-defects/2"}
    predlog.open_reader().insert_promotion_event(
        follow_row("production", "3", "2", datetime.now(UTC), "models:/mot-defects/2", percent=0.0)
    )
    p = Promoter(settings, env.registry, target)
    previous, source = p.previous_production("2")
    assert previous == "3" and "follow 3→2" in source
    p.rollback(reason="undo the hand move")
    row = _events(1)[0]
    assert (row["action"], row["from_version"], row["to_version"]) == ("rollback", "2", "3")
    assert serve.slots["production"]["version"] == "3"


def test_the_events_fallback_finds_a_promotion_behind_a_week_of_holds(local):
    """The fallback read the newest 1,000 rows: a week of `auto` holds (one per 10 min) hid the promotion."""
    from datetime import timedelta

    import pyarrow as pa

    import predlog
    from predlog.schema import row_to_arrow

    env, serve, settings, target = local
    p = _promoted(env, settings, target)
    env.registry.client.delete_model_version_tag("mot-defects", "2", PREVIOUS_TAG)
    base, t0 = _events(1)[0], datetime.now(UTC)
    holds = [
        row_to_arrow("promotion_events", {**base, "ts": t0 + timedelta(minutes=10 * (i + 1)), "action": "hold",
                                          "from_version": "2", "to_version": "", "success": True})  # fmt: skip
        for i in range(1100)
    ]
    predlog.open_reader().source.insert("promotion_events", pa.concat_tables(holds))
    assert p.previous_production("2")[0] == "1"


def test_a_refused_production_rollback_is_recorded(local):
    env, serve, settings, target = local
    p = _promoted(env, settings, target)
    p.rollback(reason="bad")  # 2 → 1, v2 rejected
    before = len(_events(100))
    with pytest.raises(Refused, match="refused: version 2 was rejected"):
        p.rollback(reason="again")
    rows = _events(100)
    assert len(rows) == before + 1
    assert (rows[0]["action"], bool(rows[0]["success"]), rows[0]["to_version"]) == ("rollback", False, "2")
    assert "refused: version 2 was rejected" in rows[0]["reason"]


def test_bringing_the_production_alias_live_is_not_refused_by_its_old_verdict(local):
    """The alias moved back by hand to a version a later deploy retired: `canary start 1` says to deploy
    it with `promote 1`, which then refused it as retired. Making live match the registry's production
    is not rolling a retired version out again."""
    env, serve, settings, target = local
    Promoter(settings, env.registry, target, force=True).promote("2")  # 1 → 2, v1 retired
    env.registry.set_alias("production", "1")
    p = Promoter(settings, env.registry, target)
    with pytest.raises(PromotionError, match="deploy it with `motlens promote promote 1`"):
        p.canary_start("1", 10)
    with pytest.raises(Refused) as refused:  # v1 scores lower than v2: the offline gate, as before
        p.promote("1")
    assert "offline: fail" in str(refused.value) and "retired" not in str(refused.value)
    forced = Promoter(settings, env.registry, target, force=True).promote("1")
    assert forced.action == "deploy" and serve.slots["production"]["version"] == "1"
    assert "forced past status" not in _events(1)[0]["reason"]
