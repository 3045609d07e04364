"""The cross-request micro-batcher on the real MiniLM: same outputs as unbatched, bounds, back-pressure, cancel."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from motlens.embedder import cosine_rows
from predictor.batcher import MicroBatcher, Overloaded

TEXTS = [
    "Horn not working (7.5 (a))",
    "Nearside Front Brake pipe corroded (1.1.11 (c))",
    "Offside Rear Brake disc worn, pitted or scored, affecting braking performance (1.1.14 (a))",
    "Windscreen damage in zone A",
    "Exhaust emits excessive smoke",
    "Nearside Rear Tyre tread depth below requirements of 1.6mm (5.2.3 (e))",
    "Offside Front Coil spring fractured (5.3.1 (b))",
    "Registration plate missing",
    "Driver's seat belt buckle not working (7.1.1 (b))",
    "Oil leak from engine, slight, but not so heavy as to be likely to drip persistently (8.4.1 (a))",
]


class GatedEncode:
    """The real encoder behind a gate, recording the token ids it was asked to embed."""

    def __init__(self, encode, open_gate: bool = True) -> None:
        self._encode = encode
        self.calls: list[list[list[int]]] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if open_gate:
            self.gate.set()

    def __call__(self, ids):
        self.calls.append([list(x) for x in ids])
        self.entered.set()
        assert self.gate.wait(60)
        return self._encode(ids)


async def test_batched_outputs_equal_unbatched(embedder):
    spy = GatedEncode(embedder.encode_tokens)
    batcher = MicroBatcher(embedder.tokenize, spy, max_items=16, max_tokens=4096, max_wait_ms=50)
    try:
        requests = [TEXTS[i % len(TEXTS) : i % len(TEXTS) + 1 + i % 3] for i in range(24)]
        results = await asyncio.gather(*(batcher.embed(r) for r in requests))
    finally:
        batcher.close()
    for texts, got in zip(requests, results, strict=True):
        alone = np.stack([embedder.encode([t])[0] for t in texts])
        assert got.shape == alone.shape
        assert cosine_rows(got, alone).min() >= 0.99999
        np.testing.assert_allclose(got, alone, atol=2e-5)
    assert batcher.stats.items == sum(len(r) for r in requests)
    assert batcher.stats.batches < len(requests)  # requests were coalesced
    assert max(len(c) for c in spy.calls) <= 16


async def test_each_batch_is_tokenised_once(embedder):
    """The ids the bucketing measured are the ids the model gets: no text is tokenised twice."""
    tokenised: list[list[str]] = []

    def tokenize(texts):
        tokenised.append(list(texts))
        return embedder.tokenize(texts)

    spy = GatedEncode(embedder.encode_tokens)
    batcher = MicroBatcher(tokenize, spy, max_items=16, max_tokens=60, max_wait_ms=20)
    try:
        requests = [TEXTS[i : i + 3] for i in range(0, 9, 3)]
        results = await asyncio.gather(*(batcher.embed(r) for r in requests))
    finally:
        batcher.close()
    assert len(tokenised) == batcher.stats.batches  # one tokenizer call per batch …
    assert sorted(t for call in tokenised for t in call) == sorted(TEXTS[:9])  # … covering each text once
    assert len(spy.calls) > len(tokenised)  # several buckets per batch (max_tokens=60), no re-tokenising
    for texts, got in zip(requests, results, strict=True):
        np.testing.assert_allclose(got, embedder.encode(texts), atol=2e-5)


def test_length_buckets_bound_padded_tokens(embedder):
    spy = GatedEncode(embedder.encode_tokens)
    batcher = MicroBatcher(embedder.tokenize, spy, max_items=6, max_tokens=120, max_wait_ms=1)
    try:
        out = batcher.encode_bucketed(TEXTS)
    finally:
        batcher.close()
    np.testing.assert_allclose(out, embedder.encode(TEXTS), atol=2e-5)
    assert sorted(x for call in spy.calls for x in call) == sorted(embedder.tokenize(TEXTS))
    for call in spy.calls:
        lengths = [len(x) for x in call]
        assert len(call) <= 6
        assert len(call) == 1 or max(lengths) * len(call) <= 120
    # sorted by length: each bucket's texts are no longer than the next bucket's
    maxima = [max(len(x) for x in c) for c in spy.calls]
    minima = [min(len(x) for x in c) for c in spy.calls]
    assert all(a <= b for a, b in zip(maxima, minima[1:], strict=False))


async def test_full_queue_raises_overloaded_and_recovers(embedder):
    spy = GatedEncode(embedder.encode_tokens, open_gate=False)
    batcher = MicroBatcher(embedder.tokenize, spy, max_items=4, max_wait_ms=0, capacity=4, retry_after_s=3)
    try:
        first = batcher.submit(TEXTS[:4])
        assert await asyncio.to_thread(spy.entered.wait, 30)  # worker busy with the first batch
        second = batcher.submit(TEXTS[4:8])  # fills the queue
        with pytest.raises(Overloaded) as info:
            batcher.submit(TEXTS[8:9])
        assert info.value.reason == "queue_full" and info.value.retry_after_s == 3
        spy.gate.set()
        a, b = await asyncio.wrap_future(first), await asyncio.wrap_future(second)
        assert a.shape == b.shape == (4, 384)
        assert (await batcher.embed(TEXTS[8:9])).shape == (1, 384)  # accepted again once drained
    finally:
        spy.gate.set()
        batcher.close()


async def test_a_request_larger_than_the_queue_waits_for_an_empty_queue_not_forever(embedder):
    """Refusing it even on an idle server would send a well-behaved client into endless 429 retries."""
    spy = GatedEncode(embedder.encode_tokens, open_gate=False)
    batcher = MicroBatcher(embedder.tokenize, spy, max_items=4, max_wait_ms=0, capacity=4)
    try:
        first = batcher.submit(TEXTS[:6])  # idle: taken although 6 > capacity
        assert await asyncio.to_thread(spy.entered.wait, 30)
        queued = batcher.submit(TEXTS[6:7])
        with pytest.raises(Overloaded):
            batcher.submit(TEXTS[:6])  # queue not empty: refused as before
        spy.gate.set()
        assert (await asyncio.wrap_future(first)).shape == (6, 384)
        assert (await asyncio.wrap_future(queued)).shape == (1, 384)
    finally:
        spy.gate.set()
        batcher.close()


async def test_cancelled_request_is_dropped_before_model_work(embedder):
    spy = GatedEncode(embedder.encode_tokens, open_gate=False)
    batcher = MicroBatcher(embedder.tokenize, spy, max_items=2, max_wait_ms=0)
    abandoned = "Abandoned request text that must never be embedded"
    try:
        first = asyncio.ensure_future(batcher.embed(TEXTS[:2]))
        assert await asyncio.to_thread(spy.entered.wait, 30)
        task = asyncio.ensure_future(batcher.embed([abandoned]))
        await asyncio.sleep(0.01)  # queued behind the busy worker
        assert batcher.pending_items == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert batcher.pending_items == 0
        spy.gate.set()
        assert (await first).shape == (2, 384)
        assert (await batcher.embed(TEXTS[2:3])).shape == (1, 384)
    finally:
        spy.gate.set()
        batcher.close()
    assert all(embedder.tokenize([abandoned])[0] not in call for call in spy.calls)
    assert batcher.stats.dropped_requests == 1 and batcher.stats.dropped_items == 1


async def test_closed_batcher_refuses_work(embedder):
    batcher = MicroBatcher(embedder.tokenize, embedder.encode_tokens)
    batcher.close()
    with pytest.raises(Overloaded) as info:
        batcher.submit(TEXTS[:1])
    assert info.value.reason == "closed"


class SecondCallBlocks:
    """The real encoder; its second call blocks until released (or fails, if told to)."""

    def __init__(self, encode, fail: bool = False) -> None:
        self._encode = encode
        self.fail = fail
        self.calls = 0
        self.blocked = threading.Event()
        self.release = threading.Event()

    def __call__(self, ids):
        self.calls += 1
        if self.calls > 1:
            self.blocked.set()
            assert self.release.wait(60)
            if self.fail:
                raise RuntimeError("bucket failed")
        return self._encode(ids)


@pytest.mark.parametrize("fail", [False, True])
async def test_each_request_is_answered_when_its_bucket_is_done(embedder, fail):
    short, long_ = TEXTS[0], TEXTS[9]
    short_ids, long_ids = embedder.tokenize([short, long_])
    assert len(short_ids) * 2 <= 30 < len(long_ids) * 2
    enc = SecondCallBlocks(embedder.encode_tokens, fail=fail)
    batcher = MicroBatcher(embedder.tokenize, enc, max_items=16, max_tokens=30, max_wait_ms=200)
    try:
        f_long, f_short = batcher.submit([long_]), batcher.submit([short])  # one batch, two buckets
        got = await asyncio.wait_for(asyncio.wrap_future(f_short), 30)  # the short bucket runs first
        assert await asyncio.to_thread(enc.blocked.wait, 30)
        assert not f_long.done()  # answered while the long bucket is still running
        np.testing.assert_allclose(got, embedder.encode([short]), atol=2e-5)
        enc.release.set()
        if fail:
            with pytest.raises(RuntimeError, match="bucket failed"):
                await asyncio.wait_for(asyncio.wrap_future(f_long), 30)
        else:
            got_long = await asyncio.wait_for(asyncio.wrap_future(f_long), 30)
            np.testing.assert_allclose(got_long, embedder.encode([long_]), atol=2e-5)
    finally:
        enc.release.set()
        batcher.close()
    assert enc.calls == 2


def test_empty_submission_is_refused(embedder):
    batcher = MicroBatcher(embedder.tokenize, embedder.encode_tokens)
    try:
        with pytest.raises(ValueError, match="nothing to embed"):
            batcher.submit([])
    finally:
        batcher.close()


def test_heap_is_trimmed_when_the_queue_runs_empty(embedder, monkeypatch):
    import predictor.batcher as batcher_mod

    assert batcher_mod.MALLOC_TRIM is not None  # glibc Linux: the CI and container platform
    calls: list[int] = []
    monkeypatch.setattr(batcher_mod, "MALLOC_TRIM", calls.append)
    batcher = MicroBatcher(embedder.tokenize, embedder.encode_tokens, max_wait_ms=1)
    try:
        batcher.submit(TEXTS[:3]).result(60)
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        batcher.close()
    assert calls and set(calls) == {0}


async def test_workers_run_batches_at_once_with_the_same_outputs(embedder):
    """Two workers take separate batches from one queue and are inside the model together.

    The first model call waits until a second one is inside (the other worker's); once two have met,
    every later call goes straight through, however the four requests were cut into batches."""
    lock = threading.Lock()
    inside = [0]
    two_inside = threading.Event()
    met: list[bool] = []

    def encode(ids):
        with lock:
            inside[0] += 1
            if inside[0] >= 2:
                two_inside.set()
        try:
            met.append(two_inside.wait(30))  # False: the other worker never entered the model
            return embedder.encode_tokens(ids)
        finally:
            with lock:
                inside[0] -= 1

    batcher = MicroBatcher(embedder.tokenize, encode, max_items=2, max_tokens=4096, max_wait_ms=0, workers=2)
    assert batcher.workers_alive == 2
    try:
        requests = [[TEXTS[i]] for i in range(4)]
        results = await asyncio.gather(*(batcher.embed(r) for r in requests))
    finally:
        batcher.close(timeout=30)
    assert met and all(met)  # the first model call had the other worker's call beside it
    for texts, got in zip(requests, results, strict=True):
        np.testing.assert_allclose(got, embedder.encode(texts), atol=2e-5)
    assert batcher.stats.items == 4 and batcher.stats.batches >= 2
    assert batcher.workers_alive == 0  # close() stopped every worker


def test_workers_must_be_positive(embedder):
    with pytest.raises(ValueError, match="workers must be >= 1"):
        MicroBatcher(embedder.tokenize, embedder.encode_tokens, workers=0)
