"""Deadlines uvicorn leaves out: a fresh connection that sends nothing, and request headers that never
complete (slow loris), on a real uvicorn server with the predictor's protocol class."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import uvicorn
from conftest import free_port
from prometheus_client import REGISTRY

from predictor.http_deadline import with_header_timeout

GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def _timeouts() -> float:
    return REGISTRY.get_sample_value("motlens_rejected_total", {"reason": "header_timeout"}) or 0.0


async def _slow_app(scope, receive, send):
    if scope["type"] != "http":
        return
    await asyncio.sleep(0.6)  # longer than the header deadline: it must not cut a request in progress
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
async def port():
    config = uvicorn.Config(
        _slow_app, host="127.0.0.1", port=free_port(), http=with_header_timeout(0.3), timeout_keep_alive=3,
        lifespan="off", log_level="warning",
    )  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    yield config.port
    server.should_exit = True
    await task


async def _closed_after(reader: asyncio.StreamReader, limit_s: float = 5.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    t0 = time.monotonic()
    data = await asyncio.wait_for(reader.read(), limit_s)
    return data, time.monotonic() - t0


async def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout(port):
    before = _timeouts()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    data, took = await _closed_after(reader, 10.0)
    assert data == b"" and 2.5 < took < 6  # the keep-alive timeout (3 s), silently: no request began
    assert _timeouts() == before
    writer.close()


async def test_headers_dripped_past_the_deadline_get_a_408_and_the_connection_closed(port):
    before = _timeouts()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    for byte in GET[:5]:  # a byte every 50 ms (0.25 s in all, a slow loris): each one arrives, none completes
        writer.write(bytes([byte]))
        await asyncio.sleep(0.05)
    data = await asyncio.wait_for(reader.read(), 5)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head
    assert json.loads(body) == {"error": "request headers not complete within 0.3s"}
    assert time.monotonic() - t0 < 2 and _timeouts() == before + 1
    writer.close()


async def test_a_pipelined_request_past_the_deadline_closes_after_the_answer_before_it(port):
    """The 408 never goes out in the middle of (or instead of) the response still being written."""
    before = _timeouts()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(GET + b"GET / HT")  # a whole request, then the start of one that never completes
    data, took = await _closed_after(reader)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(b"\r\n\r\nok") and b"408" not in data
    assert took < 3 and _timeouts() == before + 1
    writer.close()


async def test_a_slow_answer_and_an_idle_keep_alive_are_not_cut(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(2):
        writer.write(GET)
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.startswith(b"HTTP/1.1 200"), status  # answered after 0.6 s > the 0.3 s deadline
        while (await reader.readline()) != b"\r\n":
            pass
        assert await reader.readexactly(2) == b"ok"
        await asyncio.sleep(0.5)  # idle longer than the header deadline, shorter than keep-alive
    writer.close()


def test_the_predictor_serves_http_with_its_header_timeout(embedder, tmp_path):
    from predictor.http_deadline import HeaderDeadlineProtocol
    from predictor.server import PredictorServer
    from predictor.settings import ServeSettings

    srv = PredictorServer(ServeSettings(model=str(tmp_path), header_timeout_s=4.5), embedder=embedder)
    protocol = srv.rest.config.http
    assert isinstance(protocol, type) and issubclass(protocol, HeaderDeadlineProtocol)
    assert protocol.header_timeout_s == 4.5
