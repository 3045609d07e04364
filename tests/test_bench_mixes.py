"""The benchmark's text mixes and request/response codec (no model, no server)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench/ is not an installed package

from bench.loadgen import _response_ok, endpoint, request_body  # noqa: E402
from bench.mixes import build_catalogue, make_mix  # noqa: E402


def test_catalogue_covers_every_section_and_severity():
    cat = build_catalogue()
    assert len({c.text for c in cat}) == len(cat) > 100
    assert {c.section for c in cat} == set(range(9))
    assert {c.severity for c in cat} == {"advisory", "minor", "major", "dangerous"}


def test_mixes_are_seeded_and_novel_texts_never_repeat():
    assert make_mix("realistic", 0.1, seed=3).take(500) == make_mix("realistic", 0.1, seed=3).take(500)
    novel = make_mix("novel", seed=1).take(5000)
    assert len(set(novel)) == len(novel)
    catalogue = {c.text for c in build_catalogue()}
    assert not catalogue & set(novel)


def test_realistic_mix_is_zipf_skewed_with_the_configured_novel_share():
    texts = make_mix("realistic", 0.2, seed=5).take(20_000)
    catalogue = {c.text for c in build_catalogue()}
    novel_share = sum(t not in catalogue for t in texts) / len(texts)
    assert 0.18 < novel_share < 0.22
    top = Counter(t for t in texts if t in catalogue).most_common(10)
    assert sum(n for _, n in top) > 0.25 * len(texts)  # popular texts dominate, as in MOT records


def test_bad_mix_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown mix"):
        make_mix("bursty")
    with pytest.raises(ValueError, match="novel_share"):
        make_mix("realistic", 1.5)


def test_request_bodies_and_response_checks():
    v2 = json.loads(request_body("v2", ["a", "b"]))
    assert v2["inputs"][0] == {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}
    assert json.loads(request_body("openai", ["a"], model="m")) == {"model": "m", "input": ["a"]}
    assert endpoint("http://h:1/", "v2") == "http://h:1/v2/models/mot-defects/infer"
    ok = {"outputs": [{"name": "section", "data": ["1 Brakes"]}, {"name": "fail_probability", "data": [0.2]}]}
    assert _response_ok("v2", json.dumps(ok).encode(), 1)
    assert not _response_ok("v2", json.dumps(ok).encode(), 2)
    assert not _response_ok("v2", b"not json", 1)
    with pytest.raises(ValueError, match="unknown protocol"):
        request_body("grpc", ["a"])


@pytest.mark.parametrize("client", ["raw", "aiohttp"])
async def test_loadgen_counts_successes_and_errors_against_a_live_http_server(client):
    from aiohttp import web

    from bench.loadgen import run_load

    ok = json.dumps({"outputs": [{"name": "section", "data": ["1 Brakes"]},
                                 {"name": "fail_probability", "data": [0.2]}]}).encode()  # fmt: skip
    seen = Counter()

    async def infer(request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        seen["requests"] += 1
        if seen["requests"] % 5 == 0:
            return web.Response(status=429, text="busy")
        if seen["requests"] % 2:  # chunked framing on every other answer
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(ok[:10])
            await resp.write(ok[10:])
            await resp.write_eof()
            return resp
        assert body["inputs"][0]["shape"] == [1]
        return web.Response(body=ok, content_type="application/json")

    app = web.Application()
    app.router.add_post("/v2/models/mot-defects/infer", infer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        r = await run_load(f"http://127.0.0.1:{port}", make_mix("novel", seed=2), concurrency=4, duration_s=1.0,
                           warmup_s=0.2, client=client)  # fmt: skip
    finally:
        await runner.cleanup()
    assert r.requests > 20 and r.errors > 0 and set(r.error_kinds) == {"HTTP 429"}
    assert 0.1 < r.errors / (r.errors + r.requests) < 0.3  # one in five refused
    assert r.p50_ms <= r.p95_ms <= r.p99_ms
