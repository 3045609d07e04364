"""The audit trail of what the server itself serves: every change of a slot (a load at start, through
the admin API, a restored canary, a fallback and its end, a percent, a promote or rollback, the stop)
leaves one ``promotion_events`` row in order; and the last-known-good record of the alias (followed
or the one the server started on) names the version production serves once the alias confirms it,
also when production got there through the admin API (a promotion CLI's local target)."""

from __future__ import annotations

import json

import httpx
import pytest
import test_reliability_lkg
from test_reliability_faults import start_server, wait_until
from test_reliability_lkg import REF, fallback, predict, record_lkg, registry_down

import predlog
from predlog.settings import PredlogSettings

MODEL = "mot-defects"
registry_home = test_reliability_lkg.registry_home  # the fixture: version 1 registered as production


@pytest.fixture
def log_settings(tmp_path) -> PredlogSettings:
    return PredlogSettings(dir=tmp_path / "predlog", flush_interval_s=0.1)


def trail(settings: PredlogSettings) -> list[tuple]:
    """(action, from, to, canary percent, slot) of every row, oldest first."""
    reader = predlog.open_reader(settings)
    try:
        events = reader.promotion_events(limit=100).sort_values("ts")
    finally:
        reader.close()
    assert set(events.target) <= {"serve"} and events.actor.str.startswith("motlens serve@").all()
    slots = [json.loads(d)["slot"] for d in events.details]
    return list(zip(events.action, events.from_version, events.to_version, events.canary_percent, slots, strict=True))


def details(settings: PredlogSettings, action: str) -> list[dict]:
    reader = predlog.open_reader(settings)
    try:
        events = reader.promotion_events(limit=100).sort_values("ts")
    finally:
        reader.close()
    rows = events[events.action == action]
    return [{**json.loads(d), "reason": r} for d, r in zip(rows.details, rows.reason, strict=True)]


def admin(base: str, path: str, body: dict | None = None) -> dict:
    r = httpx.post(f"{base}/motlens/admin/{path}", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_admin_operations_leave_the_servers_trail_in_order(registry_home, tiny_bundle, embedder, log_settings):
    """A canary loaded, its share moved twice, rolled back, loaded again and promoted through the
    admin API (what ``motlens promote --target local`` does, or a hand-typed curl): each change one
    row, with the versions and the percent it left, between the start's load and the stop."""
    registry_home.register_bundle(tiny_bundle.root, metrics={}, params={}, alias=None)  # version 2
    thread, base = start_server(REF, embedder, writer=predlog.open_writer(log_settings), admin_enabled=True)
    try:
        thread.wait_ready()
        admin(base, "slots/canary/load", {"ref": f"models:/{MODEL}/2"})
        admin(base, "canary/percent", {"percent": 25})
        admin(base, "canary/percent", {"percent": 40})
        admin(base, "canary/percent", {"percent": 40})  # no change: no row
        admin(base, "rollback")
        admin(base, "slots/canary/load", {"ref": f"models:/{MODEL}/2"})
        admin(base, "promote")
        assert predict(base).json()["model_version"] == "2"
    finally:
        thread.stop()
    assert trail(log_settings) == [
        ("serve_load", "", "1", 0.0, "production"),
        ("serve_load", "", "2", 0.0, "canary"),
        ("serve_percent", "1", "2", 25.0, "canary"),
        ("serve_percent", "1", "2", 40.0, "canary"),
        ("serve_rollback", "2", "1", 0.0, "canary"),
        ("serve_load", "", "2", 0.0, "canary"),
        ("serve_promote", "1", "2", 0.0, "production"),
        ("serve_stop", "2", "", 0.0, "production"),
    ]
    loads = details(log_settings, "serve_load")
    assert [d["cause"] for d in loads] == ["start", "admin", "admin"]
    assert (
        loads[0]["ref"] == REF and loads[1]["reason"] == f"canary slot loaded models:/{MODEL}/2 through the admin API"
    )
    assert [d["previous_percent"] for d in details(log_settings, "serve_percent")] == [0.0, 25.0]


def test_a_fallback_and_its_end_are_in_the_trail(registry_home, tiny_bundle, embedder, log_settings, monkeypatch):
    """Restarted during a registry outage, the server serves the last-known-good version 1; the alias
    moved to 2 meanwhile, so once the registry answers it loads 2. Both are rows: the fallback (and
    why), and the load that replaced it — not an alias move at that time."""
    registry = registry_home
    record_lkg(registry)
    registry_down(monkeypatch)
    thread, base = start_server(REF, embedder, writer=predlog.open_writer(log_settings))
    try:
        thread.wait_ready()
        assert predict(base).json()["model_version"] == "1" and fallback(base) == 1
        registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")  # → 2
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        wait_until(lambda: predict(base).json()["model_version"] == "2", timeout=120)
    finally:
        thread.stop()
    assert [t[:3] for t in trail(log_settings)] == [
        ("serve_load", "", "1"),
        ("serve_load", "1", "2"),
        ("serve_stop", "2", ""),
    ]
    first, second = details(log_settings, "serve_load")
    assert first["fallback"] == "registry_unreachable" and "LAST-KNOWN-GOOD" in first["reason"]
    assert second["cause"] == "registry_back" and second["fallback"] is None
    assert "replaced the last-known-good version 1" in second["reason"]


def test_a_confirmed_fallback_is_cleared_in_the_trail(registry_home, embedder, log_settings, monkeypatch):
    record_lkg(registry_home)
    registry_down(monkeypatch)
    thread, base = start_server(REF, embedder, writer=predlog.open_writer(log_settings))
    try:
        thread.wait_ready()
        assert fallback(base) == 1
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        wait_until(lambda: fallback(base) == 0, timeout=120)
    finally:
        thread.stop()
    assert [t[:3] for t in trail(log_settings)] == [
        ("serve_load", "", "1"),
        ("serve_fallback_cleared", "1", "1"),
        ("serve_stop", "1", ""),
    ]


def recorded_version(registry) -> str:
    return json.loads(registry.lkg_path(REF).read_text())["version"]


def assert_an_outage_restart_serves(version: str, embedder, monkeypatch) -> None:
    """Restarted while the registry is unreachable, the server serves ``version`` from its record."""
    registry_down(monkeypatch)
    thread, base = start_server(REF, embedder)
    try:
        thread.wait_ready()
        assert predict(base).json()["model_version"] == version and fallback(base) == 1
    finally:
        thread.stop()


def test_the_followed_alias_record_follows_an_admin_promote(registry_home, tiny_bundle, embedder, monkeypatch):
    """Production moved to version 2 through the admin API, then the alias caught up (the local
    target's order). The ``@production`` last-known-good record must name 2: it kept naming 1, and a
    restart during a registry outage served version 1 again — rolled back, perhaps rejected since."""
    registry = registry_home
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias=None)  # version 2
    thread, base = start_server(REF, embedder, admin_enabled=True, follow_alias="production", follow_interval_s=0.2)
    try:
        thread.wait_ready()
        assert recorded_version(registry) == "1"
        admin(base, "slots/canary/load", {"ref": f"models:/{MODEL}/2"})
        admin(base, "promote")
        registry.set_alias("production", "2")
        polls = thread.server.slots.follow_polls
        wait_until(lambda: thread.server.slots.follow_polls >= polls + 3, 60)
        assert predict(base).json()["model_version"] == "2"
    finally:
        thread.stop()
    assert recorded_version(registry) == "2"
    assert_an_outage_restart_serves("2", embedder, monkeypatch)


def test_without_a_follower_the_record_follows_an_admin_promote_once_the_alias_does(
    registry_home, tiny_bundle, embedder, monkeypatch
):
    """The same promote on a server without ``--follow-alias`` (``--model models:/…@production``, the
    default): its record kept naming 1 for good, so a restart during an outage rolled back to it.
    While the alias still names 1 the record stays; once the alias names 2, the record does."""
    registry = registry_home
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias=None)  # version 2
    thread, base = start_server(REF, embedder, admin_enabled=True, follow_interval_s=0.2)
    slots = thread.server.slots
    try:
        thread.wait_ready()
        admin(base, "slots/canary/load", {"ref": f"models:/{MODEL}/2"})
        admin(base, "promote")
        wait_until(lambda: slots.alias_checks >= 3, 60)
        assert recorded_version(registry) == "1" and slots._confirming  # the alias names 1: still watching
        registry.set_alias("production", "2")
        wait_until(lambda: recorded_version(registry) == "2", 60)
        wait_until(lambda: not slots._confirming, 30)  # the watch ended with it
        assert predict(base).json()["model_version"] == "2"
    finally:
        thread.stop()
    assert_an_outage_restart_serves("2", embedder, monkeypatch)


def test_an_admin_install_the_alias_never_names_leaves_the_record(
    registry_home, tiny_bundle, embedder, monkeypatch, caplog
):
    """A version loaded into production by hand, the alias left where it was: the watch gives up after
    its grace and says so; replaced in production meanwhile, it stops at once. The record names 1."""
    from predictor import slots as slots_module

    registry = registry_home
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias=None)  # version 2
    monkeypatch.setattr(slots_module, "ADMIN_GRACE_MIN_S", 1.0)
    caplog.set_level("INFO", logger="predictor.slots")
    thread, base = start_server(REF, embedder, admin_enabled=True, follow_interval_s=0.05)
    slots = thread.server.slots
    try:
        thread.wait_ready()
        admin(base, "slots/production/load", {"ref": f"models:/{MODEL}/2"})
        wait_until(lambda: "alias production does not name version 2" in caplog.text, 60)
        wait_until(lambda: not slots._confirming, 30)
        assert recorded_version(registry) == "1"

        monkeypatch.setattr(slots_module, "ADMIN_GRACE_MIN_S", 600.0)
        admin(base, "slots/production/load", {"ref": f"models:/{MODEL}/2"})  # the same version again
        wait_until(lambda: bool(slots._confirming), 30)
        checks = slots.alias_checks
        wait_until(lambda: slots.alias_checks >= checks + 2, 60)
        admin(base, "slots/production/load", {"ref": str(tiny_bundle.root)})  # replaced: a path, no alias
        wait_until(lambda: not slots._confirming, 30)
        assert caplog.text.count("does not name version") == 1 and recorded_version(registry) == "1"
    finally:
        thread.stop()


def test_a_start_load_still_retrying_leaves_an_admin_load_alone(
    registry_home, tiny_bundle, embedder, monkeypatch, caplog
):
    """The ``--model`` load kept retrying (registry down) after the admin API had filled production;
    once the registry answered, its retry swapped ``--model``'s version in over the admin's choice,
    with no word."""
    registry_down(monkeypatch)
    caplog.set_level("INFO", logger="predictor.slots")
    thread, base = start_server(REF, embedder, admin_enabled=True, lkg_enabled=False)
    try:
        wait_until(lambda: "cannot serve" in caplog.text)  # the start load failed once: retrying
        admin(base, "slots/production/load", {"ref": str(tiny_bundle.root)})
        monkeypatch.delenv("MLFLOW_TRACKING_URI")  # the registry answers again
        wait_until(lambda: "no longer retrying" in caplog.text or _production_ref(base) != str(tiny_bundle.root))
        assert _production_ref(base) == str(tiny_bundle.root)
    finally:
        thread.stop()


def _production_ref(base: str) -> str:
    return httpx.get(f"{base}/motlens/admin/slots", timeout=30).json()["slots"]["production"]["ref"]


async def test_a_request_in_flight_at_a_promote_keeps_the_slot_that_took_it(tiny_bundle, embedder, monkeypatch):
    """A request the canary took, answered after a promote relabelled the canary's unit, was answered
    and logged as production."""
    from predictor.backend import load_backend
    from predictor.cache import EmbeddingCache
    from predictor.pipeline import ServingUnit
    from predictor.settings import ServeSettings

    unit = ServingUnit(
        load_backend(str(tiny_bundle.root), embedder=embedder), ServeSettings(batch_max_wait_ms=1), EmbeddingCache(0),
        "canary",
    )  # fmt: skip
    embed = unit.batcher.embed

    async def embed_then_promote(texts):
        out = await embed(texts)
        unit.slot = "production"  # what SlotManager.promote does to the canary's unit
        return out

    monkeypatch.setattr(unit.batcher, "embed", embed_then_promote)
    try:
        result, _ = await unit.predict(["Horn not working"], None)
    finally:
        unit.batcher.close()
    assert result.slot == "canary" and unit.slot == "production"
