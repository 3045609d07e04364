"""``event_loop_nice``: the event-loop thread yields the CPU to the model threads, which keep the process's
priority across model loads and swaps."""

from __future__ import annotations

import asyncio
import socket
import sys
import threading

import httpx
import pytest

from predictor.priority import nice_current_thread, thread_nice

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice is Linux-only")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nice_of(prefix: str) -> dict[int, int | None]:
    """Native thread id → nice value of this process's live threads whose name starts with ``prefix``."""
    return {t.native_id: thread_nice(t.native_id) for t in threading.enumerate() if t.name.startswith(prefix)}


def test_nice_only_ever_lowers_this_threads_priority():
    out: dict[str, int | None] = {}

    def body() -> None:
        base = thread_nice()
        out["raised"] = nice_current_thread((base or 0) + 3)
        out["not_lowered"] = nice_current_thread(0)
        out["base"] = base

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert out["raised"] == out["not_lowered"] == out["base"] + 3
    assert thread_nice() == out["base"], "only the calling thread changes"


def test_model_threads_keep_the_process_priority_across_loads(tiny_bundle, embedder):
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    base = thread_nice()
    settings = ServeSettings(
        model=str(tiny_bundle.root), http_port=_port(), grpc_port=_port(), event_loop_nice=7, enable_grpc=False
    )
    server = PredictorServer(settings, embedder=embedder, host="127.0.0.1")
    thread = ServerThread(server).start().wait_ready()
    try:
        assert thread_nice(thread._thread.native_id) == max(base, 7), "the event loop runs niced"
        assert set(_nice_of("motlens-production").values()) == {base}, "batcher threads are not"
        assert set(_nice_of("motlens-load").values()) == {base}
        # a swap builds the new unit (and its batcher thread) on the load thread too
        before = set(_nice_of("motlens-production"))
        asyncio.run_coroutine_threadsafe(server.slots.load("production", str(tiny_bundle.root)), server._loop).result(
            120
        )
        after = _nice_of("motlens-production")
        assert set(after) != before and set(after.values()) == {base}
        body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["Horn not working (7.5 (a))"]}]}
        r = httpx.post(f"http://127.0.0.1:{settings.http_port}/v2/models/mot-defects/infer", json=body, timeout=60)
        assert r.status_code == 200
    finally:
        thread.stop()
