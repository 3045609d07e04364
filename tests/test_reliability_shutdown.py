"""Graceful shutdown of the real ``motlens serve`` process under load.

Contract (docs/reliability.md): on SIGTERM readiness turns false at once (``draining``) while the
server still answers predictions for ``drain_s``; then it stops accepting connections, finishes every
request it accepted, closes the prediction-log writer and exits 0. A client can see three things: a
complete 200 answer, a refused connection (nothing was processed), or — racing the listener's close —
a connection dropped before any response (nothing was processed either). Never an error status, never
a request processed without its answer, never an answered request missing from the log.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from conftest import free_port

MODEL = "mot-defects"
MAX_REQUESTS_PER_CLIENT = 500
GRACE_S = 20
DRAIN_S = 3  # seconds of not-ready-but-serving before the listener closes


def motlens_bin() -> str:
    exe = Path(sys.executable).with_name("motlens")
    return str(exe) if exe.exists() else "motlens"


def wait_ready(proc: subprocess.Popen, base: str, log_path: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, log_path.read_text()[-3000:]
        try:
            if httpx.get(f"{base}/v2/models/{MODEL}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


@dataclass
class ShutdownRun:
    """What the clients saw around one SIGTERM."""

    rc: int
    server_log: str
    before: list[tuple[str, int, int, int | str]]  # (request_id, started, items, outcome), sent before SIGTERM
    after: list[tuple[str, int, int, int | str]]
    readiness: list[int | str]  # /motlens/ready answers after SIGTERM, in order
    logged: list[tuple[str, int]]  # (request_id, item_index) rows in the prediction log
    answered: list[tuple[str, int]]  # items of requests answered 200


def run_sigterm_under_load(tiny_bundle, tmp_path: Path, drain_s: float) -> ShutdownRun:
    """Start ``motlens serve``, run 4 closed-loop clients, SIGTERM after 20 answers, collect the outcomes."""
    import predlog
    from predlog.settings import PredlogSettings

    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTLENS_", "MLFLOW_TRACKING"))}
    env.update(
        MOTLENS_HOME=str(tmp_path / "home"),
        MOTLENS_SERVE_GRACE_PERIOD_S=str(GRACE_S),
        MOTLENS_SERVE_DRAIN_S=str(drain_s),
        MOTLENS_PREDLOG_FLUSH_INTERVAL_S="0.2",
    )
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [motlens_bin(), "serve", "--model", str(tiny_bundle.root), "--http-port", str(http_port),
             "--grpc-port", str(free_port()), "--device", "cpu", "--threads", "1"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{http_port}"
    signalled = threading.Event()
    stop = threading.Event()
    lock = threading.Lock()
    order = itertools.count()
    sent_signal_at: list[int] = []
    outcomes: list[tuple[str, int, int, int | str]] = []  # outcome: HTTP status, "refused" or "dropped"
    readiness: list[tuple[int, int | str]] = []

    def client(worker: int) -> None:
        for i in range(MAX_REQUESTS_PER_CLIENT):
            if stop.is_set():
                return
            rid = f"term-{worker}-{i}-{uuid.uuid4().hex[:8]}"
            texts = [f"Offside Rear Brake disc worn, record {rid} (1.1.14 (a))", "Horn not working"]
            with lock:
                started = next(order)
            try:  # a fresh connection per request: no keep-alive reuse races with the close
                r = httpx.post(
                    f"{base}/v1/models/{MODEL}:predict", json={"instances": texts},
                    headers={"x-request-id": rid}, timeout=120,
                )  # fmt: skip
                outcome: int | str = r.status_code
            except httpx.ConnectError:
                outcome = "refused"
            except (httpx.RemoteProtocolError, httpx.ReadError):
                outcome = "dropped"
            with lock:
                outcomes.append((rid, started, len(texts), outcome))
            if outcome == "refused":
                return  # the listener is closed: the server is going away

    def probe() -> None:
        signalled.wait()
        while not stop.is_set():
            try:
                r = httpx.get(f"{base}/motlens/ready", timeout=5)
                seen: int | str = r.status_code
                if r.status_code == 503 and r.json()["reason"] != "server is shutting down":
                    seen = f"503 {r.json()['reason']}"
            except httpx.TransportError:
                seen = "refused"
            with lock:
                readiness.append((next(order), seen))
            if seen == "refused":
                return
            time.sleep(0.02)

    threads = [threading.Thread(target=client, args=(w,)) for w in range(4)] + [threading.Thread(target=probe)]
    try:
        wait_ready(proc, base, log_path)
        for t in threads:
            t.start()
        deadline = time.monotonic() + 300
        while len(outcomes) < 20:
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()[-3000:]
            time.sleep(0.05)
        with lock:
            sent_signal_at.append(next(order))
            proc.send_signal(signal.SIGTERM)
        signalled.set()
        rc = proc.wait(drain_s + GRACE_S + 60)
    finally:
        stop.set()
        signalled.set()
        if proc.poll() is None:
            proc.kill()
        for t in threads:
            t.join(120)

    reader = predlog.open_reader(PredlogSettings(dir=tmp_path / "home" / "predlog"))
    try:
        rows = reader.query("SELECT request_id, item_index FROM predictions", {})
    finally:
        reader.close()
    sig = sent_signal_at[0]
    return ShutdownRun(
        rc=rc,
        server_log=log_path.read_text(),
        before=[o for o in outcomes if o[1] < sig],
        after=[o for o in outcomes if o[1] > sig],
        readiness=[s for _, s in sorted(readiness)],
        logged=sorted(zip(rows["request_id"], rows["item_index"].astype(int), strict=True)),
        answered=sorted((rid, i) for rid, _, n, o in outcomes if o == 200 for i in range(n)),
    )


@pytest.mark.slow
def test_sigterm_under_load_not_ready_then_drained_exit_0_and_no_lost_row(tiny_bundle, tmp_path):
    run = run_sigterm_under_load(tiny_bundle, tmp_path, drain_s=DRAIN_S)
    assert run.rc == 0, run.server_log[-3000:]
    assert "shutting down" in run.server_log
    outcomes = run.before + run.after
    assert run.before and all(o[3] == 200 for o in run.before), [o for o in run.before if o[3] != 200][:5]
    assert all(o[3] in (200, "refused", "dropped") for o in run.after), [o for o in run.after if o[3] != 200][:5]
    assert any(o[3] == 200 for o in run.after)  # answered while draining (not ready, still serving)
    assert 503 in run.readiness and run.readiness[-1] == "refused"
    assert 200 not in run.readiness  # never ready again after SIGTERM
    assert run.logged == run.answered  # every answered item once; nothing logged for an unanswered request
    print(
        f"\nshutdown: {len(run.before)} requests sent before SIGTERM, {len(run.after)} after: "
        + ", ".join(f"{k}: {sum(o[3] == k for o in outcomes)}" for k in (200, "refused", "dropped"))
        + f"; {len(run.logged)} rows logged, {len(run.answered) - len(set(run.logged) & set(run.answered))} lost"
    )


@pytest.mark.slow
def test_a_stop_against_a_hung_clickhouse_keeps_to_the_grace_period(tiny_bundle, embedder, tmp_path):
    """A ClickHouse that accepts connections and never answers: the stop waited for the ``serve_stop`` audit
    row's own INSERT (its send/receive timeout, 30 s by default) before the log's close took its grace period,
    past Knative's 60 s. Audit rows are spooled like prediction rows now: the stop takes about one grace
    period, and every row the server did not send is on disk, stored once when ClickHouse is back."""
    from test_predlog_faults import SilentServer, stopped, wait_for
    from test_reliability_faults import predict_sequentially, replay_into_chdb, start_server

    import predlog
    from predlog.settings import PredlogSettings

    grace = 2
    hung = SilentServer()
    settings = PredlogSettings(
        clickhouse_url=f"http://127.0.0.1:{hung.port}", dir=tmp_path / "predlog", batch_rows=4, flush_interval_s=0.05,
        connect_timeout_s=1, send_receive_timeout_s=60,
    )  # fmt: skip
    writer = predlog.open_writer(settings)
    try:
        thread, base = start_server(str(tiny_bundle.root), embedder, writer, grace_period_s=grace)
        thread.wait_ready()
        sent = predict_sequentially(base, 5)
        started = time.monotonic()
        thread.stop(timeout=300)
        took = time.monotonic() - started
        s = writer.stats()
    finally:
        hung.release()
    assert [status for _, status in sent] == [200] * 5
    assert took < grace + 20, took  # the audit row's INSERT alone waited 60 s
    assert s["spool_rows"] == 10 and s["dropped"] == 0 and s["events"]["spool_rows"] == 2, s
    assert wait_for(lambda: stopped(writer), 60)
    actions: list[str] = []
    assert replay_into_chdb(settings.root, actions) == sorted((rid, i) for rid, _ in sent for i in range(2))
    assert actions == ["serve_load", "serve_stop"]


async def test_a_load_cancelled_by_shutdown_frees_what_it_built(tiny_bundle, embedder):
    """The load thread carries on after its caller is cancelled; its unit was once left running."""
    import asyncio
    import threading

    from predictor.backend import load_backend
    from predictor.cache import EmbeddingCache
    from predictor.settings import ServeSettings
    from predictor.slots import SlotManager

    gate, built = threading.Event(), threading.Event()

    def gated(ref, **kw):  # the real loader, held until the caller is gone
        gate.wait(60)
        backend = load_backend(ref, embedder=embedder)
        built.set()
        return backend

    slots = SlotManager(ServeSettings(model=str(tiny_bundle.root), cache_bytes=0), EmbeddingCache(0), gated)
    task = asyncio.create_task(slots.load("canary", str(tiny_bundle.root)))
    await asyncio.sleep(0.2)
    task.cancel()
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slots.slots["canary"].unit is None and slots.slots["canary"].loading is None

    def batchers() -> list[str]:
        return [t.name for t in threading.enumerate() if t.name.startswith("motlens-") and "canary" in t.name]

    assert await asyncio.to_thread(built.wait, 120)  # the unit is built after the cancellation …
    await asyncio.sleep(0.5)
    for _ in range(300):  # … and then freed
        if not batchers():
            break
        await asyncio.sleep(0.1)
    assert batchers() == [], batchers()
    await slots.shutdown()


async def test_a_start_load_still_retrying_does_not_replace_what_the_admin_api_installed(
    tiny_bundle, embedder, tmp_path
):
    """The start-up load, retrying after a failure (registry down), saw the slot still empty while an
    admin load was running, waited for the slot and then replaced the admin's model with its own."""
    import asyncio
    import shutil
    import threading

    from predictor.backend import ModelLoadError, load_backend
    from predictor.cache import EmbeddingCache
    from predictor.settings import ServeSettings
    from predictor.slots import SlotManager

    start_ref, admin_ref = str(tiny_bundle.root), str(shutil.copytree(tiny_bundle.root, tmp_path / "admin"))
    gate, calls = threading.Event(), []

    def loader(ref, **kw):
        calls.append(ref)
        if ref == start_ref and calls.count(start_ref) == 1:
            raise ModelLoadError("model registry unreachable", transient=True)
        if ref == admin_ref:
            gate.wait(60)  # a slow admin load: download, warm-up, golden check
        return load_backend(ref, embedder=embedder)

    slots = SlotManager(ServeSettings(model=start_ref, cache_bytes=0, gc_freeze=False), EmbeddingCache(0), loader)
    retry = asyncio.create_task(slots.load_with_retry("production", start_ref))
    await asyncio.sleep(0.3)  # the first attempt failed; the retry sleeps 1 s
    admin = asyncio.create_task(slots.load("production", admin_ref, cause="admin"))
    await asyncio.sleep(1.5)  # the retry wakes while the admin load holds the slot
    gate.set()
    await admin
    assert await asyncio.wait_for(retry, 120) is False
    assert slots.slots["production"].ref == admin_ref and calls == [start_ref, admin_ref]
    await slots.shutdown()
