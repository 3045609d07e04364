"""Overload: a bounded queue answers bursts with 429 + Retry-After (never 5xx) and the server stays up;
oversized bodies get 413 before any parsing."""

from __future__ import annotations

import itertools
import threading

import httpx
import pytest
from conftest import free_port

MODEL = "mot-defects"
QUEUE_TEXTS = 8
_ids = itertools.count()


def metric(base: str, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=10).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


@pytest.fixture(scope="module")
def small_queue(tiny_bundle, embedder):
    """A server whose batcher admits at most QUEUE_TEXTS queued texts and 64 KiB bodies; no cache."""
    from predictor.server import PredictorServer, ServerThread
    from predictor.settings import ServeSettings

    settings = ServeSettings(
        model=str(tiny_bundle.root), http_port=free_port(), grpc_port=free_port(), enable_grpc=False,
        queue_capacity=QUEUE_TEXTS, batch_max_items=QUEUE_TEXTS, retry_after_s=2, cache_bytes=0,
        max_body_bytes=64 * 1024,
    )  # fmt: skip
    thread = ServerThread(PredictorServer(settings, embedder=embedder, host="127.0.0.1")).start().wait_ready()
    yield f"http://127.0.0.1:{settings.http_port}"
    thread.stop()


def burst(base: str, n: int) -> list[httpx.Response]:
    """``n`` requests of 4 fresh texts, released together."""
    barrier = threading.Barrier(n)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        texts = [f"Nearside Rear Tyre tread depth below requirements, burst {next(_ids)} (5.2.3 (e))" for _ in range(4)]
        with httpx.Client(timeout=120) as client:
            barrier.wait()
            r = client.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": texts})
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return answers


@pytest.mark.slow
def test_burst_beyond_the_queue_gets_429_with_retry_after_never_5xx(small_queue):
    base = small_queue
    rejected_before = metric(base, "motlens_rejected_total", reason="queue_full")
    misses_before = metric(base, "motlens_cache_misses_total")
    answers: list[httpx.Response] = []
    for _ in range(5):  # bounded: a burst of 24 × 4 texts against an 8-text queue overflows at once
        answers += burst(base, 24)
        if any(r.status_code == 429 for r in answers):
            break
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429}, sorted(set(codes))
    assert 429 in codes and 200 in codes
    for r in answers:
        if r.status_code == 429:
            assert r.headers["retry-after"] == "2"
            assert "queue" in r.json()["error"]
        else:
            assert len(r.json()["predictions"]) == 4
    assert metric(base, "motlens_rejected_total", reason="queue_full") - rejected_before == codes.count(429)
    # the cache counts the texts served only (no cache here: every one a miss); a refused request's
    # lookups made the dashboard's hit rate fall under overload
    assert metric(base, "motlens_cache_misses_total") - misses_before == 4 * codes.count(200)
    print(f"\noverload: {len(codes)} requests in bursts of 24: {codes.count(200)} × 200, {codes.count(429)} × 429")
    # still up and ready, and a lone request is served
    assert httpx.get(f"{base}/v2/models/{MODEL}/ready", timeout=10).status_code == 200
    r = httpx.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": ["Horn not working"]}, timeout=60)
    assert r.status_code == 200


@pytest.mark.parametrize("path", [f"/v1/models/{MODEL}:predict", f"/v2/models/{MODEL}/infer"])
def test_oversized_body_is_413_before_parsing(small_queue, path):
    base = small_queue
    before = metric(base, "motlens_rejected_total", reason="body_too_large")
    junk = b"{" + b"x" * (64 * 1024)  # not JSON at all: a parser would answer 400, not 413
    r = httpx.post(f"{base}{path}", content=junk, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "exceeds 65536 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(20):
            yield b"y" * 8192

    r = httpx.post(f"{base}{path}", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert metric(base, "motlens_rejected_total", reason="body_too_large") - before == 2
    # just under the limit is parsed (and refused for what it is, a malformed body)
    r = httpx.post(f"{base}{path}", content=junk[: 60 * 1024], headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(f"{base}/v1/models/{MODEL}:predict", json={"instances": ["Wiper blade deteriorated"]}, timeout=60)
    assert r.status_code == 200  # and the server still serves
