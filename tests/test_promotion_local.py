"""Local target: `motlens serve` with production + canary slots, driven through its admin API while
real traffic flows. The split seen in the prediction log matches the percent; no request fails;
the real drift job (canary mode) flags a canary that disagrees with production and `auto` rolls it back."""

from __future__ import annotations

import itertools
import math
import random
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import httpx
import numpy as np
import pytest
from conftest import _TINY_TEXTS, free_port

from promotion.local_target import LocalTarget
from promotion.settings import PromoteSettings
from promotion.status import read_status
from promotion.tags import STEP_AT_TAG
from promotion.workflow import Promoter

TEXTS = [t for t, _, _ in _TINY_TEXTS]
CLIENTS = 2


class Traffic:
    """Two client threads posting single-text v1 requests until stopped; every status code is kept."""

    def __init__(self, base: str) -> None:
        self.base, self.codes, self.errors = base, [], []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(CLIENTS)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as client:
            while not self._stop.is_set():
                try:
                    r = client.post(f"{self.base}/v1/models/mot-defects:predict",
                                    json={"instances": [rng.choice(TEXTS)]})
                    self.codes.append(r.status_code)
                except httpx.HTTPError as e:
                    self.errors.append(repr(e))

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


def _rows_since(reader, since, need: int, canary: tuple[str, int] = ("", 0), timeout: float = 180.0):
    """Per (version, slot) counts from the prediction log once at least ``need`` rows arrived
    (and ``canary`` = (version, n): at least n of them from that canary)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = reader.live_stats(since=since, model_name="mot-defects")
        counts = {(r.model_version, r.slot): int(r.n) for r in stats.itertuples()}
        total = sum(counts.values())
        enough = total >= need and counts.get((canary[0], "canary"), 0) >= canary[1]
        if enough or time.monotonic() > deadline:
            return counts, total
        time.sleep(0.5)


def _split_ok(counts: dict, total: int, version: str, percent: int) -> None:
    """Within 4 σ of the binomial, plus the requests in flight at the switch (one per client)."""
    n_canary = counts.get((version, "canary"), 0)
    p = percent / 100
    sigma = math.sqrt(p * (1 - p) * total)
    assert abs(n_canary - p * total) <= 4 * sigma + CLIENTS, (counts, percent)


def _drift_job(registry, version: str, out):
    import predlog
    from drift.job import DriftJob
    from drift.settings import DriftSettings

    # alpha: the column tests' family-wise false-alarm rate. At the default 0.01 a same-model canary
    # "drifts" in about 1 run of 150 by design (simulated: 0.5-0.7 %; one CI run failed on a
    # chi-square at p = 0.0017). 1e-4 makes that ~1 in 10^4; the disagreeing canary below is caught by
    # prediction agreement (about 0 % vs 90 % needed), which no alpha touches.
    settings = DriftSettings(canary=True, version=version, window="30m", output=out, min_rows=60, alpha=1e-4,
                             min_embedding_rows=40, min_shared_texts=5, log_artifact=False, progress=False)
    return DriftJob(settings, reader=predlog.open_reader(), registry=registry).run()


def _other_head_bundle(tiny_bundle, embedder, out):
    """The tiny bundle with the section head's rows rotated: a model that disagrees with production."""
    from motlens.bundle import assemble, make_golden
    from motlens.embedder import default_model_dir
    from motlens.head import DefectHead

    head = tiny_bundle.head()
    weights = {k: np.asarray(v).copy() for k, v in head.weights.items()}
    weights["section.weight"] = np.roll(weights["section.weight"], 3, axis=0)
    weights["section.bias"] = np.roll(weights["section.bias"], 3, axis=0)
    other = DefectHead(weights=weights, features=head.features)
    return assemble(out, default_model_dir(), other, make_golden(embedder, other, TEXTS), version="x", run_id="x")


def _two_versions(registry, tiny_bundle, monkeypatch) -> None:
    """MOTLENS_* pointed at ``registry``'s home, and versions 1 and 2 of the tiny bundle registered."""
    monkeypatch.setenv("MOTLENS_HOME", str(registry.state.home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", registry.tracking_uri)
    monkeypatch.delenv("MOTLENS_CLICKHOUSE_URL", raising=False)
    for i in range(2):
        registry.register_bundle(tiny_bundle.root, metrics={"section_macro_f1": 0.6}, params={"i": i}, alias=None)


@contextmanager
def _served_at_production(registry, embedder) -> Iterator[tuple[LocalTarget, Promoter]]:
    """A real server on ``models:/mot-defects@production`` with the admin API, and a local-target promoter."""
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    serve = ServeSettings(model="models:/mot-defects@production", http_port=free_port(), grpc_port=free_port(),
                          enable_grpc=False, cache_bytes=0, admin_enabled=True)  # fmt: skip
    thread = ServerThread(PredictorServer(serve, embedder=embedder, host="127.0.0.1"))
    thread.start().wait_ready()
    try:
        settings = PromoteSettings(target="local", local_url=f"http://127.0.0.1:{serve.http_port}", golden_check=False)
        target = LocalTarget(settings)
        yield target, Promoter(settings, registry, target)
    finally:
        thread.stop()


@pytest.mark.slow
def test_local_canary_promote_and_rollback_under_traffic(registry, tiny_bundle, embedder, tmp_path, monkeypatch):
    import predlog
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings
    from predlog.settings import PredlogSettings

    _two_versions(registry, tiny_bundle, monkeypatch)
    other = _other_head_bundle(tiny_bundle, embedder, tmp_path / "other")
    registry.register_bundle(other.root, metrics={"section_macro_f1": 0.6}, params={"i": 2}, alias=None)

    registry.set_alias("production", "1")
    writer = predlog.open_writer(PredlogSettings(flush_interval_s=0.05, batch_rows=64))
    # the design's default ref: an alias, which the local target reads as the version it resolved to
    serve = ServeSettings(model="models:/mot-defects@production", http_port=free_port(), grpc_port=free_port(),
                          enable_grpc=False, log_embedding_sample_rate=1.0, grace_period_s=20, cache_bytes=0,
                          admin_enabled=True)
    thread = ServerThread(PredictorServer(serve, embedder=embedder, writer=writer, host="127.0.0.1"))
    thread.start().wait_ready()
    base = f"http://127.0.0.1:{serve.http_port}"
    # latency on a shared 2-core box is noise, and bounding error rates needs hundreds of requests per
    # step: neither is the subject here (the live gate's statistics have their own tests)
    settings = PromoteSettings(target="local", local_url=base, steps=[25, 50, 100], min_samples=40,
                               min_step_interval_s=0, p99_slack_ms=2000, live_confidence=0.55)
    target = LocalTarget(settings)
    p = Promoter(settings, registry, target)
    reader = p.reader()
    try:
        with Traffic(base) as traffic:
            assert read_status(p)["disagreements"] == []  # no --force needed to start from the alias ref
            assert target.read().production_version == "1"

            p.canary_start("2", 25)
            for percent in itertools.chain([25], [50, 100]):
                if percent != 25:
                    p.advance()
                assert target.read().percent == percent
                since = datetime.fromisoformat(registry.resolve("2").tags[STEP_AT_TAG])
                counts, total = _rows_since(reader, since, 240, canary=("2", 160))  # enough to bound its rates
                _split_ok(counts, total, "2", percent)
                if percent == 25:  # the drift job's verdict on this canary (gates read the latest)
                    _rows_since(reader, since, 0, canary=("2", 80))
                    result = _drift_job(registry, "2", tmp_path / "drift-2")
                    assert result.summary["details"]["status"] == "no_drift", result.messages
            p.promote()
            live = target.read()
            assert (live.production_version, live.canary_active) == ("2", False)
            since = datetime.now(UTC)
            counts, total = _rows_since(reader, since, 100)
            assert set(counts) == {("2", "production")}

            # a canary that disagrees with production: the real drift job flags it, auto rolls back
            p.canary_start("3", 50)
            since = datetime.fromisoformat(registry.resolve("3").tags[STEP_AT_TAG])
            counts, total = _rows_since(reader, since, 240)
            _split_ok(counts, total, "3", 50)
            _rows_since(reader, since, 0, canary=("3", 80))
            result = _drift_job(registry, "3", tmp_path / "drift-3")
            assert result.summary["details"]["status"] == "drift", result.messages
            out = p.auto()
            assert out.action == "rollback" and "drift" in {r.name for r in out.gates if r.status == "fail"}
            live = target.read()
            assert (live.production_version, live.canary_active) == ("2", False)
            since = datetime.now(UTC)
            counts, total = _rows_since(reader, since, 100)
            assert set(counts) == {("2", "production")}
        assert traffic.errors == [] and set(traffic.codes) == {200}, (traffic.errors[:3], set(traffic.codes))
        assert len(traffic.codes) > 1000
    finally:
        thread.stop()
    assert registry.aliases() == {"production": "2"}
    assert registry.resolve("3").tags["promotion.status"] == "rejected"


@pytest.mark.slow
def test_local_promote_brings_the_registrys_production_live(registry, tiny_bundle, embedder, tmp_path, monkeypatch):
    """`motlens serve` loaded `@production` (v1), then `motlens train --alias production` moved the alias to
    v2: `promote promote 2` once refused, 'version 2 is already production' (the server served v1)."""
    from promotion.workflow import PromotionError

    _two_versions(registry, tiny_bundle, monkeypatch)
    registry.set_alias("production", "1")
    with _served_at_production(registry, embedder) as (target, p):
        registry.set_alias("production", "2")
        disagree = "live production is version 1 but the registry's 'production' alias is 2"
        assert read_status(p)["disagreements"] == [disagree]
        p.promote("2")
        assert target.read().production_version == "2" and read_status(p)["disagreements"] == []
        with pytest.raises(PromotionError, match="version 2 is already production on local motlens serve"):
            p.promote("2")


@pytest.mark.slow
def test_local_canary_start_rerun_after_a_restart_keeps_the_start_time(
    registry, tiny_bundle, embedder, tmp_path, monkeypatch
):
    """A server restarted without the canary the registry records (alias, tags): re-running
    `canary start 2` reloads it and once re-stamped promotion.canary_started_at (dropping drift evidence)."""
    from promotion.tags import STARTED_AT_TAG

    _two_versions(registry, tiny_bundle, monkeypatch)
    registry.set_alias("production", "1")
    registry.set_alias("canary", "2")
    started = "2024-01-02T03:04:05+00:00"
    registry.set_tags("2", {"promotion.status": "canary", "promotion.canary_percent": "10", STARTED_AT_TAG: started})
    with _served_at_production(registry, embedder) as (target, p):
        assert target.read().canary_version is None
        p.canary_start("2", 10)
        live = target.read()
        assert (live.canary_version, live.percent) == ("2", 10) and read_status(p)["disagreements"] == []
        assert registry.resolve("2").tags[STARTED_AT_TAG] == started


def test_a_silent_server_fails_a_status_read_in_its_read_timeout():
    """A server that accepts connections and never answers held `promote status` for the 300 s a canary
    load may take; a read (GET) has its own, short timeout."""
    import socket

    from promotion.targets import TargetUnavailable

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        settings = PromoteSettings(local_url=f"http://127.0.0.1:{port}", http_timeout_s=20, read_timeout_s=0.5)
        t0 = time.monotonic()
        with pytest.raises(TargetUnavailable, match="timed out"):
            LocalTarget(settings).read()
        assert time.monotonic() - t0 < settings.http_timeout_s  # the read timeout applied, not the load's


@contextmanager
def _answering(status: int, headers: dict[str, str], body: bytes = b"") -> Iterator[tuple[str, list[dict]]]:
    """A one-route HTTP server answering every request alike; yields its URL and the headers it got."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            seen.append(dict(self.headers))
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_redirect_is_not_followed_with_the_admin_token():
    """urllib followed a redirect to any host with the Authorization header: a proxy's login redirect
    sent the admin token to another host (over plain http)."""
    from promotion.targets import TargetError

    with _answering(200, {"Content-Type": "application/json"}, b'{"slots": {}}') as (other, other_seen):
        with _answering(302, {"Location": f"{other}/login"}) as (url, seen):
            settings = PromoteSettings(local_url=url, local_token="an-admin-token-of-32-characters!")
            with pytest.raises(TargetError, match=r"HTTP 302 .*redirect to .*/login, not followed"):
                LocalTarget(settings).read()
    assert seen and seen[0].get("Authorization") == "Bearer an-admin-token-of-32-characters!"
    assert other_seen == []


def test_an_answer_without_slots_is_a_target_error_naming_it():
    """A 200 from something that is not `motlens serve` was a bare ``KeyError: 'slots'``."""
    from promotion.targets import TargetError

    with _answering(200, {"Content-Type": "application/json"}, b'{"status": "ok"}') as (url, _):
        with pytest.raises(TargetError, match="names no production and canary slots"):
            LocalTarget(PromoteSettings(local_url=url)).read()
