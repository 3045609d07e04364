"""Zero-downtime model switch: a server following the ``production`` alias of a real (sqlite) MLflow
registry swaps from version 1 to version 2 under a closed-loop client load.

Checked by counting and ordering only: no failed request; once any response said version 2, every
request sent afterwards is answered by version 2; every request's prediction-log rows are stored
exactly once with the version that answered; the old version is retired (model freed, batcher
stopped, cache entries purged, ``motlens_model_info`` no longer lists it).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
import uuid
from dataclasses import dataclass

import httpx
import pytest
from conftest import free_port
from prometheus_client import REGISTRY

MODEL = "mot-defects"
MAX_REQUESTS_PER_CLIENT = 400  # bounds the load even if the switch never happens


@dataclass
class Outcome:
    request_id: str
    started: int  # position in the global start/finish order
    finished: int
    status: int  # -1: transport error
    version: str | None
    items: int


def wait_until(condition, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


@pytest.mark.slow
def test_follow_alias_switches_under_load_without_a_failed_request_or_lost_row(
    registry, tiny_bundle, embedder, tmp_path, monkeypatch
):
    import predlog
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings
    from predlog.settings import PredlogSettings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))  # the server's Registry() finds this one
    v1 = registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    assert v1.version == "1"

    log_settings = PredlogSettings(dir=tmp_path / "predlog", flush_interval_s=0.1)
    writer = predlog.open_writer(log_settings)
    settings = ServeSettings(
        model=f"models:/{MODEL}@production", follow_alias="production", follow_interval_s=0.2,
        http_port=free_port(), grpc_port=free_port(), grace_period_s=20,
    )  # fmt: skip
    server = PredictorServer(settings, embedder=embedder, writer=writer, host="127.0.0.1")
    thread = ServerThread(server).start().wait_ready()
    base = f"http://127.0.0.1:{settings.http_port}"
    old_unit = server.slots.slots["production"].unit
    assert old_unit is not None and old_unit.version == "1"
    v1_run_id = old_unit.backend.run_id

    order = itertools.count()
    lock = threading.Lock()
    outcomes: list[Outcome] = []
    v1_texts: list[str] = []
    stop = threading.Event()

    def client(worker: int) -> None:
        with httpx.Client(timeout=120) as http:
            for i in range(MAX_REQUESTS_PER_CLIENT):
                if stop.is_set():
                    return
                rid = f"switch-{worker}-{i}-{uuid.uuid4().hex[:8]}"
                texts = [f"Nearside Front Brake pipe corroded, record {rid} (1.1.11 (c))", "Horn not working"]
                with lock:
                    started = next(order)
                try:
                    r = http.post(
                        f"{base}/v1/models/{MODEL}:predict", json={"instances": texts}, headers={"x-request-id": rid}
                    )
                    status, version = r.status_code, r.json().get("model_version")
                except Exception as e:  # noqa: BLE001 - a transport failure is a failed request too
                    status, version = -1, repr(e)
                with lock:
                    outcomes.append(Outcome(rid, started, next(order), status, version, len(texts)))
                    if version == "1":
                        v1_texts.append(texts[0])

    def count(version: str) -> int:
        with lock:
            return sum(o.version == version for o in outcomes)

    workers = [threading.Thread(target=client, args=(w,)) for w in range(3)]
    for w in workers:
        w.start()
    try:
        wait_until(lambda: count("1") >= 10)
        v2 = registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
        assert v2.version == "2"
        wait_until(lambda: count("2") >= 15)
    finally:
        stop.set()
        for w in workers:
            w.join(120)
        status = server.slots.status()
        thread.stop()  # graceful: drains and closes the writer

    failed = [o for o in outcomes if o.status != 200]
    assert not failed, failed[:5]
    assert {o.version for o in outcomes} == {"1", "2"}
    first_v2_answer = min(o.finished for o in outcomes if o.version == "2")
    after = [o for o in outcomes if o.started > first_v2_answer]
    assert after and {o.version for o in after} == {"2"}  # never back to version 1

    assert status["slots"]["production"]["version"] == "2"
    assert status["slots"]["production"]["golden_min_cosine"] >= 0.999  # golden-checked before the swap
    assert old_unit.backend.embedder is None  # the old model was freed …
    assert old_unit.batcher.workers_alive == 0  # … its batcher stopped …
    assert server.cache.get_many("1", v1_texts[:20]) == [None] * len(v1_texts[:20])  # … its cache purged
    # Other servers of the test session may serve another "version 1": identify ours by its run.
    info = {
        (s.labels.get("version"), s.labels.get("run_id"))
        for metric in REGISTRY.collect()
        if metric.name == "motlens_model_info"
        for s in metric.samples
        if s.value == 1 and s.labels.get("slot") == "production"
    }
    assert ("1", v1_run_id) not in info

    reader = predlog.open_reader(log_settings)
    try:
        rows = reader.query("SELECT request_id, item_index, model_version FROM predictions", {})
    finally:
        reader.close()
    assert len(rows) == sum(o.items for o in outcomes)  # no row lost, none twice
    logged = {(r.request_id, int(r.item_index)): r.model_version for r in rows.itertuples()}
    expected = {(o.request_id, i): o.version for o in outcomes for i in range(o.items)}
    assert logged == expected
    n1, n2 = sum(o.version == "1" for o in outcomes), sum(o.version == "2" for o in outcomes)
    print(f"\nswitch: {len(outcomes)} requests ({n1} by v1, {n2} by v2), 0 failed; {len(rows)} rows logged, 0 lost")


@pytest.mark.slow
def test_follow_alias_does_not_undo_a_promote_through_the_admin_api(registry, tiny_bundle, embedder, monkeypatch):
    """The local promotion target promotes on the server first and moves the alias second: a poll in
    between once loaded the old version back into production (and the canary was gone by then)."""
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias=None)
    settings = ServeSettings(
        model=f"models:/{MODEL}@production", follow_alias="production", follow_interval_s=0.2,
        http_port=free_port(), grpc_port=free_port(), enable_grpc=False, admin_enabled=True, cache_bytes=0,
    )  # fmt: skip
    server = PredictorServer(settings, embedder=embedder, host="127.0.0.1")
    thread = ServerThread(server).start().wait_ready()
    admin = f"http://127.0.0.1:{settings.http_port}/motlens/admin"

    def production() -> str | None:
        unit = server.slots.slots["production"].unit
        return unit.version if unit else None

    def polls_from_now(n: int) -> None:
        """Wait until the follower has completed ``n`` more alias polls."""
        target = server.slots.follow_polls + n
        wait_until(lambda: server.slots.follow_polls >= target, timeout=120)

    try:
        assert httpx.post(f"{admin}/slots/canary/load", json={"ref": f"models:/{MODEL}/2"}, timeout=120).is_success
        assert httpx.post(f"{admin}/promote", timeout=120).is_success
        polls_from_now(10)  # ten polls while the alias still names version 1
        assert production() == "2" and not server.slots.slots["production"].loading
        registry.set_alias("production", "2")  # the CLI's second step
        polls_from_now(5)
        assert production() == "2"
        registry.set_alias("production", "1")  # from now on the alias leads again
        wait_until(lambda: production() == "1", timeout=120)
    finally:
        thread.stop()


@pytest.mark.slow
def test_follow_alias_retries_a_version_whose_artifacts_were_unreachable(registry, tiny_bundle, embedder, monkeypatch):
    """One failed fetch (artifact store away) once refused the version for the life of the process."""
    from pathlib import Path
    from urllib.parse import urlparse

    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    v2 = registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias=None)
    stored = Path(urlparse(v2.artifact_uri).path)
    away = stored.with_name("model-away")
    settings = ServeSettings(
        model=f"models:/{MODEL}@production", follow_alias="production", follow_interval_s=0.2,
        http_port=free_port(), grpc_port=free_port(), enable_grpc=False, cache_bytes=0,
    )  # fmt: skip
    server = PredictorServer(settings, embedder=embedder, host="127.0.0.1")
    thread = ServerThread(server).start().wait_ready()

    def production() -> str | None:
        unit = server.slots.slots["production"].unit
        return unit.version if unit else None

    try:
        stored.rename(away)  # the artifact store cannot give version 2 for now
        registry.set_alias("production", "2")
        wait_until(lambda: "cannot fetch" in (server.slots.slots["production"].error or ""), timeout=60)
        assert production() == "1"
        away.rename(stored)
        wait_until(lambda: production() == "2", timeout=120)
    finally:
        if away.exists():
            away.rename(stored)
        thread.stop()


def _canary_server(registry, tiny_bundle, embedder, monkeypatch, *, canary_alias: bool, tags: dict[str, str]):
    """Production v1 in the registry, v2 maybe aliased ``canary`` and tagged; a server following ``production``."""
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="canary" if canary_alias else None)
    if tags:
        registry.set_tags("2", tags)
    settings = ServeSettings(
        model=f"models:/{MODEL}@production", follow_alias="production", follow_interval_s=0.2,
        http_port=free_port(), grpc_port=free_port(), enable_grpc=False, admin_enabled=True, cache_bytes=0,
    )  # fmt: skip
    server = PredictorServer(settings, embedder=embedder, host="127.0.0.1")
    return server, ServerThread(server).start().wait_ready(), f"http://127.0.0.1:{settings.http_port}/motlens/admin"


def _polls_from_now(server, n: int) -> None:
    target = server.slots.follow_polls + n
    wait_until(lambda: server.slots.follow_polls >= target, timeout=120)


@pytest.mark.slow
def test_follow_alias_restores_the_running_canary_at_start(registry, tiny_bundle, embedder, monkeypatch):
    """A restarted `serve --follow-alias production` once came back without the canary the registry
    records as running (alias `canary`, promotion tags at 10 %): status disagreed, `auto` was stuck."""
    tags = {"promotion.status": "canary", "promotion.canary_percent": "10"}
    server, thread, admin = _canary_server(registry, tiny_bundle, embedder, monkeypatch, canary_alias=True, tags=tags)
    try:
        _polls_from_now(server, 1)  # the first poll restores the canary
        st = httpx.get(f"{admin}/slots", timeout=30).json()
        assert st["slots"]["canary"]["version"] == "2", st
        assert st["slots"]["canary"]["ref"] == f"models:/{MODEL}/2"
        assert st["canary_percent"] == 10.0 and st["slots"]["production"]["version"] == "1"
        assert httpx.post(f"{admin}/rollback", timeout=120).is_success  # later admin changes stand
        _polls_from_now(server, 3)
        st = httpx.get(f"{admin}/slots", timeout=30).json()
        assert st["slots"]["canary"]["version"] is None and st["canary_percent"] == 0.0
    finally:
        thread.stop()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("canary_alias", "tags"),
    [
        (True, {}),  # aliased by hand, never started by the promotion CLI
        (False, {"promotion.status": "canary", "promotion.canary_percent": "10"}),  # alias gone
        (True, {"promotion.status": "canary", "promotion.canary_percent": "0"}),
    ],
    ids=["no-tags", "no-alias", "zero-percent"],
)
def test_follow_alias_restores_no_canary_the_registry_does_not_record(
    registry, tiny_bundle, embedder, monkeypatch, canary_alias, tags
):
    server, thread, admin = _canary_server(
        registry, tiny_bundle, embedder, monkeypatch, canary_alias=canary_alias, tags=tags
    )
    try:
        _polls_from_now(server, 2)
        st = httpx.get(f"{admin}/slots", timeout=30).json()
        assert st["slots"]["canary"]["version"] is None and st["slots"]["canary"]["loading"] is None, st
        assert st["canary_percent"] == 0.0
    finally:
        thread.stop()


def test_a_follower_switch_leaves_one_promotion_events_row_between_start_and_stop(
    registry, tiny_bundle, embedder, tmp_path, monkeypatch
):
    """The alias moved outside the CLI (MlflowClient) and the server's follower swapped: no audit row
    said so, and the newest event named the version no longer served."""
    import predlog
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings
    from predlog.settings import PredlogSettings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")
    log_settings = PredlogSettings(dir=tmp_path / "predlog", flush_interval_s=0.1)
    settings = ServeSettings(
        model=f"models:/{MODEL}@production", follow_alias="production", follow_interval_s=0.2,
        http_port=free_port(), grpc_port=free_port(), enable_grpc=False, cache_bytes=0,
    )  # fmt: skip
    server = PredictorServer(settings, embedder=embedder, writer=predlog.open_writer(log_settings), host="127.0.0.1")
    thread = ServerThread(server).start().wait_ready()
    try:
        registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")  # version 2
        wait_until(lambda: (u := server.slots.slots["production"].unit) is not None and u.version == "2", 120)
        polls = server.slots.follow_polls
        wait_until(lambda: server.slots.follow_polls >= polls + 3, 60)  # the row is written; no second one
        served_since = getattr(server.slots, "served_since", {}).get("production")
    finally:
        thread.stop()
    reader = predlog.open_reader(log_settings)
    try:
        events = reader.promotion_events(limit=10)
    finally:
        reader.close()
    events = events.sort_values("ts")
    trail = list(zip(events.action, events.from_version, events.to_version, events.target, strict=True))
    assert trail == [  # what the server did, in order, one row each: start, the switch, the stop
        ("serve_load", "", "1", "serve"),
        ("follow", "1", "2", "serve"),
        ("serve_stop", "2", "", "serve"),
    ], events
    row = events[events.action == "follow"].iloc[0]
    assert row.actor.startswith("motlens serve@") and row.success and not row.dry_run
    assert row.reason == "alias production moved to version 2"
    assert served_since is not None  # the row's time is when version 2 started serving
    assert abs((row.ts.to_pydatetime() - served_since).total_seconds()) < 0.01


def test_a_follow_row_that_cannot_be_written_warns_once_and_serving_goes_on(caplog, monkeypatch):
    """On ClickHouse the predictor's user may lack INSERT on promotion_events."""
    from datetime import UTC, datetime

    import predictor.events as events
    from predlog.settings import PredlogSettings

    monkeypatch.setattr(events, "_warned", threading.Event())
    settings = PredlogSettings(clickhouse_url="http://127.0.0.1:1/motlens", connect_timeout_s=1)
    row = events.follow_row("production", "1", "2", datetime.now(UTC), f"models:/{MODEL}/2", percent=0.0)
    with caplog.at_level("DEBUG", logger="predictor.events"):
        assert events.write_event(settings, row) is False
        assert events.write_event(settings, row) is False
    warnings = [r for r in caplog.records if r.name == "predictor.events" and r.levelname == "WARNING"]
    assert len(warnings) == 1 and "INSERT on promotion_events" in warnings[0].getMessage()


@pytest.mark.slow
def test_follower_rows_say_what_happened_a_revert_a_refusal_and_the_canary_share(
    registry, tiny_bundle, bad_golden_bundle, embedder, tmp_path, monkeypatch
):
    """Audit review: the follower's undoing of an admin install after its grace read "alias production
    moved to version 1" (it had not moved); a version the alias named but the server refused left no row;
    a follow row said canary 0 % while the canary kept its 10 %."""
    import predlog
    from predictor import slots as slots_module
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings
    from predlog.settings import PredlogSettings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    monkeypatch.setattr(slots_module, "ADMIN_GRACE_MIN_S", 1.0)
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias="production")  # 1
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias=None)  # 2: the canary
    registry.register_bundle(tiny_bundle.root, metrics={}, params={}, alias=None)  # 3: installed by hand
    registry.register_bundle(bad_golden_bundle, metrics={}, params={}, alias=None)  # 4: fails its golden check
    log_settings = PredlogSettings(dir=tmp_path / "predlog", flush_interval_s=0.1)
    settings = ServeSettings(
        model=f"models:/{MODEL}@production", follow_alias="production", follow_interval_s=0.05,
        http_port=free_port(), grpc_port=free_port(), enable_grpc=False, admin_enabled=True, cache_bytes=0,
    )  # fmt: skip
    server = PredictorServer(settings, embedder=embedder, writer=predlog.open_writer(log_settings), host="127.0.0.1")
    thread = ServerThread(server).start().wait_ready()
    admin = f"http://127.0.0.1:{settings.http_port}/motlens/admin"

    def production() -> str | None:
        unit = server.slots.slots["production"].unit
        return unit.version if unit else None

    try:
        assert httpx.post(f"{admin}/slots/canary/load", json={"ref": f"models:/{MODEL}/2"}, timeout=120).is_success
        assert httpx.post(f"{admin}/canary/percent", json={"percent": 10}, timeout=30).is_success
        assert httpx.post(f"{admin}/slots/production/load", json={"ref": f"models:/{MODEL}/3"}, timeout=120).is_success
        wait_until(lambda: production() == "1", 120)  # the grace ran out: the alias's version serves again
        registry.set_alias("production", "4")
        polls = server.slots.follow_polls
        wait_until(lambda: server.slots.follow_polls >= polls + 10, 120)  # refused, and not again
        assert production() == "1"
    finally:
        thread.stop()
    reader = predlog.open_reader(log_settings)
    try:
        events = reader.promotion_events(limit=50).sort_values("ts")
    finally:
        reader.close()
    follow = events[events.action == "follow"]
    assert list(zip(follow.from_version, follow.to_version, strict=True)) == [("3", "1")], events
    row = follow.iloc[0]
    assert row.reason.startswith("alias production still names version 1: the admin API's version 3"), row.reason
    assert json.loads(row.details)["cause"] == "admin_grace_expired"
    assert row.canary_percent == 10.0
    refused = events[events.action == "serve_refused"]
    assert len(refused) == 1, events
    row = refused.iloc[0]
    assert (row.from_version, row.to_version, bool(row.success)) == ("1", "4", False)
    assert "refused" in row.reason and "golden" in row.reason and row.canary_percent == 10.0
